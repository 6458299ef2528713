"""Consensus merging: task arithmetic keeping only the weights at least k tasks' TALL masks use.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
2024. arXiv:2405.07813 ; follows the authors' consensus merge (construct_consensus_mask
and generate_task_masks of github.com/nik-dim/tall_masks, as the LiNeS code ships them),
on task arithmetic's multi-task vector (their use_ties: false).

tau_MTL = sum_t tau_t. Task t's TALL mask keeps the entries where |tau_t| > lambda *
|tau_MTL - tau_t| (the task's own change outweighs what the others add); the consensus mask
keeps the entries at least prune_threshold_k masks keep (k = 2 drops both "catastrophic" and
"selfish" weights); theta = theta_pre + alpha * tau_MTL * consensus. The authors choose each
task's lambda from 0.2 to 0.6 on that task's validation data; here one lambda serves every
task, so the merge reads no data (a submission's grid may select it, and alpha, on
validation). Defaults: k = 2 and alpha = 0.3 (task arithmetic's) and lambda = 0.4, the
middle of the authors' range.
"""

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack


class ConsensusParams(Params):
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0, description="alpha")
    tall_mask_lambda: float = Field(0.4, ge=0.0, le=10.0, description="lambda of every task's TALL mask")
    prune_threshold_k: int = Field(2, ge=0, le=1000, description="tasks whose masks must keep a weight")


def consensus_delta(deltas, tall_mask_lambda: float, k: int):
    """tau_MTL where at least k of the tasks' TALL masks keep the entry, else 0 (deltas stacked [T, ...])."""
    total = deltas.sum(dim=0)
    masks = deltas.abs() > (total - deltas).abs() * tall_mask_lambda
    return total * (masks.float().sum(dim=0) >= k)


@method("consensus_merging", params=ConsensusParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              one_expert={"scaling_factor": 1.0, "prune_threshold_k": 0}))
def consensus_merging(ctx: FusionContext, p: ConsensusParams):
    experts = ctx.experts
    return map_entries(ctx.base, lambda k, b: b.float() + p.scaling_factor * consensus_delta(
        stack(experts, k) - b.float(), p.tall_mask_lambda, p.prune_threshold_k))
