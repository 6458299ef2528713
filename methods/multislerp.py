"""Multi-SLERP: barycentric interpolation of several experts on a hypersphere, per tensor.

Goddard, "Multi-SLERP" (mergekit's `multislerp` merge method, mergekit 0.1.5); mergekit:
Goddard et al., EMNLP 2024 Industry Track, arXiv:2403.13257 .

Per tensor, each expert's vector v_i (its task vector theta_i - theta_pre when
relative_to_base, mergekit's form with a base model; else its weights) is projected onto
the unit sphere; the normalised weighted mean of the unit vectors is the tangent point;
the weighted mean of the unit vectors' tangent components is mapped back by the
exponential map, and scaled by the weighted mean of the vectors' norms. Two antipodal
vectors with cancelling weights fall back to linear interpolation, more refuse (mergekit's
error). Weights are per task (equal when omitted) and normalised to sum to one.
"""

from typing import Optional

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries
from methods._common import origin
from methods._weights import task_weights


class MultiSlerpParams(Params):
    weights: Optional[dict[str, float]] = Field(None, description="per-task weight; default: equal")
    relative_to_base: bool = Field(True, description="interpolate task vectors, not weights")
    normalize_weights: bool = True
    eps: float = Field(1e-8, gt=0.0)


def multislerp(vectors: list[torch.Tensor], weights: torch.Tensor, eps: float) -> torch.Tensor:
    """mergekit's multislerp of several tensors of one shape (no base: the caller subtracts it)."""
    if len(vectors) == 1:
        return vectors[0]
    stacked = torch.stack(vectors)
    flat = stacked.reshape(len(vectors), -1)
    weights = weights.to(flat.device)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(vectors) == 2:
            return stacked[0] * weights[0] + stacked[1] * weights[1]
        raise ValueError("the weighted sum of the unit tensors is zero (antipodal experts with balancing "
                         "weights); choose other weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * weights.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    result = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    return (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])


@method("multislerp", params=MultiSlerpParams, category="merging",
        properties=Properties(one_expert={}, why="no scaling factor"))
def multislerp_merge(ctx: FusionContext, p: MultiSlerpParams):
    experts = ctx.experts
    weights = torch.tensor(task_weights(ctx.tasks, p.weights, p.normalize_weights), dtype=torch.float32)

    def merge(key, base):
        centre = origin(base, p.relative_to_base)
        return centre + multislerp([e[key].float() - centre for e in experts], weights, p.eps)

    return map_entries(ctx.base, merge)
