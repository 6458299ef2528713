"""PCB-merging: balance each parameter's competition within and across tasks, drop, rescale.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
arXiv:2410.02396 ; follows the authors' key steps (PCB_merge in pcb-merging.py of
github.com/duguodong7/pcb-merging), on the flattened task vectors of all floating entries.

With the N task vectors as rows of T (N x D): magnitudes are clipped to their per-task
0.01% and 99.99% quantiles (the clipped task vectors keep their signs); intra-balancing
exp(N * minmax(|T|)^2) and inter-balancing tanh(T * sum_j T_j) multiply into each entry's
score; scores below each task's (1 - pcb_ratio) quantile become that quantile, and a
per-task min-max normalisation gives weights (so only the top pcb_ratio fraction of each
task's entries weighs anything); the merged task vector is sum_i w_i * T_i / sum_i w_i, and
theta = theta_pre + lambda * it. The authors then search lambda (0.8 to 2.2, or per-task
coefficients by evolution strategies on validation data); here lambda is a hyperparameter
a submission's grid selects on validation. pcb_ratio = 0.1 and lambda = 1.0 by default.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta, mergeable

# The authors' clip of magnitudes to the per-task [0.01%, 99.99%] quantile range.
CLIP_RATIO = 0.0001


class PcbParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="lambda")
    pcb_ratio: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each task's entries kept")


def minmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    low, high = x.min(dim=dim, keepdim=True).values, x.max(dim=dim, keepdim=True).values
    return (x - low) / (high - low)


def clip_rows(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Each row clamped to its sorted values at positions int(d * low_ratio) and int(d * (1 - high_ratio)) - 1
    (the authors sort each row; two k-th values are the same numbers without a sorted copy and its indices)."""
    d = x.shape[1]
    low = x.kthvalue(int(d * low_ratio) + 1, dim=1, keepdim=True).values
    high = x.kthvalue(int(d * (1 - high_ratio) - 1) + 1, dim=1, keepdim=True).values
    return x.clamp(low, high)


def pcb_merge(tvs: torch.Tensor, pcb_ratio: float) -> torch.Tensor:
    """The merged task vector of [N, D] task vectors."""
    n = tvs.shape[0]
    magnitudes = clip_rows(tvs.abs(), CLIP_RATIO, CLIP_RATIO)
    intra = torch.exp(n * minmax(magnitudes, 1) ** 2)
    inter = torch.tanh(tvs * tvs.sum(dim=0))
    weights = minmax(clip_rows(intra * inter, 1 - pcb_ratio, 0), dim=1)
    return (torch.sign(tvs) * magnitudes * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)


def flatten(task_vectors: list[dict], keys: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([tv[k].reshape(-1) for k in keys]) for tv in task_vectors])


def unflatten(flat: torch.Tensor, like: dict, keys: list[str]) -> dict:
    sizes = [like[k].numel() for k in keys]
    return {k: part.view(like[k].shape) for k, part in zip(keys, flat.split(sizes))}


@method("pcb_merging", params=PcbParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              why="one expert: the quantile clip and the min-max weights change it"))
def pcb_merging(ctx: FusionContext, p: PcbParams):
    base = ctx.base
    keys = [k for k, v in base.items() if mergeable(k, v)]
    task_vectors = ctx.task_vectors()
    merged = pcb_merge(flatten(task_vectors, keys), p.pcb_ratio)
    return apply_delta(base, unflatten(merged, task_vectors[0], keys), p.scaling_factor)
