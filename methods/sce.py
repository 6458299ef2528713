"""SCE: select salient task-vector entries, calculate per-expert weights, erase minority signs.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (the SCE merge of FuseChat-2.0),
2024. arXiv:2408.07990 ; as implemented by mergekit 0.1.5 (merge method `sce`).

Per tensor, with task vectors tau_i = theta_i - theta_pre stacked over the experts:
select keeps the select_topk fraction of entries (of those with nonzero variance) whose
variance across experts is largest, zeroing the rest in every tau_i; calculate weighs
each expert by its mean squared (selected) task vector, normalised over experts (uniform
when the squares sum below 1e-6, as mergekit does: a scale-dependent switch kept for
parity); erase keeps only the entries agreeing with the elected sign (TIES' summed-mass
election, methods/_common.majority_sign_mask); the merged delta is the weighted mean of
what remains. theta = theta_pre + lambda * delta; lambda = 1 is mergekit's SCE.
select_topk = 1.0 (select nothing away) is mergekit's default.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack
from methods._common import majority_sign_mask


class SceParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="lambda")
    select_topk: float = Field(1.0, gt=0.0, le=1.0, description="fraction of highest-variance entries kept")


def select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the fraction of entries (of those whose variance is nonzero) whose variance across
    experts is largest, else 0."""
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def expert_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each expert's mean squared delta over the sum of them (uniform if that sum is ~0)."""
    weights = deltas.pow(2).mean(dim=list(range(1, deltas.dim())))
    total = float(weights.sum())
    return torch.full_like(weights, 1 / len(weights)) if abs(total) < 1e-6 else weights / total


def sce_delta(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    deltas = deltas * select_mask(deltas, select_topk)
    weights = expert_weights(deltas).view(-1, *[1] * (deltas.dim() - 1))
    kept = weights * majority_sign_mask(deltas)
    return (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


@method("sce", params=SceParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={}, quick={"select_topk": 0.5}))
def sce(ctx: FusionContext, p: SceParams):
    experts = ctx.experts
    return map_entries(ctx.base, lambda k, b: b.float() + p.scaling_factor * sce_delta(
        stack(experts, k) - b.float(), p.select_topk))
