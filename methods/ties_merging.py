"""TIES-merging: trim, elect sign, disjoint merge of task vectors.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
arXiv:2306.01708

Choices, named so results are comparable:
- top_k_scope='global' keeps the top-k fraction of each expert's whole flattened task
  vector (the paper and FusionBench); 'per_tensor' trims each tensor separately.
- disjoint_merge='mean' averages the agreeing entries (the paper); 'sum' adds them
  (FusionBench's default merge_func).
"""

from typing import Literal

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.tensors import apply_delta, mergeable


class TiesParams(Params):
    # The paper's lambda for its mean merge is 1 (FusionBench's 0.3 goes with its sum merge).
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0)
    top_k: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    top_k_scope: Literal["global", "per_tensor"] = "global"
    disjoint_merge: Literal["mean", "sum"] = "mean"


def trim(flat: torch.Tensor, top_k: float) -> torch.Tensor:
    """Zero all but the top_k fraction (by magnitude) of each row, ties kept as FusionBench does."""
    n, d = flat.shape
    drop = d - int(d * top_k)
    if drop <= 0:
        return flat
    kth = flat.abs().kthvalue(drop, dim=1, keepdim=True).values
    return flat * (flat.abs() >= kth)


def elect_and_merge(trimmed: torch.Tensor, how: str) -> torch.Tensor:
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    total = selected.sum(dim=0)
    if how == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1)


def ties_delta(base, experts, p: TiesParams) -> dict[str, torch.Tensor]:
    keys = [k for k, v in base.items() if mergeable(k, v)]
    if p.top_k_scope == "per_tensor":
        out = {}
        for k in keys:
            rows = torch.stack([(e[k].float() - base[k].float()).flatten() for e in experts])
            out[k] = elect_and_merge(trim(rows, p.top_k), p.disjoint_merge).view_as(base[k]).float()
        return out
    rows = torch.stack([torch.cat([(e[k].float() - base[k].float()).flatten() for k in keys]) for e in experts])
    merged = elect_and_merge(trim(rows, p.top_k), p.disjoint_merge)
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = merged[offset:offset + n].view_as(base[k])
        offset += n
    return out


@method("ties_merging", params=TiesParams, category="merging")
def ties_merging(ctx: FusionContext, params: TiesParams):
    return apply_delta(ctx.base, ties_delta(ctx.base, ctx.experts, params), params.scaling_factor)
