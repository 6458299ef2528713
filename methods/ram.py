"""RAM / RAM+: average the task-vector entries experts share, keep (and rescale) unique ones.

Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (Reinforced Agent
Merging), 2026. arXiv:2601.13572 ; as mergekit 0.1.5 implements it (`ram`, `ramplus_tl`).

Per tensor, an expert contributes an entry where its task vector exceeds epsilon in
magnitude. Entries with one contributor take that expert's value; entries with several take
the mean over the contributors; others stay at the base. RAM+ (variant 'ram_plus', mergekit's
tensor-local form) scales each expert's unique entries by 1 + r * min(rho, alpha), rho the
number of its entries it shares over the number it alone changed. Written for the sparse
task vectors of RL fine-tuning: on densely fine-tuned experts every entry is shared and RAM
is the mean task vector added to the base. Defaults are mergekit's (epsilon 1e-5, r 0.1,
alpha 0.2).
"""

from typing import Literal

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack


class RamParams(Params):
    variant: Literal["ram", "ram_plus"] = "ram"
    epsilon: float = Field(1e-5, ge=0.0, description="a task-vector entry above this magnitude counts as changed")
    r: float = Field(0.1, ge=0.0, description="ram_plus: rescaling strength of unique entries")
    alpha: float = Field(0.2, ge=0.0, description="ram_plus: cap on the shared/unique ratio")


def ram_delta(deltas: torch.Tensor, p: RamParams) -> torch.Tensor:
    """The merged task vector of one tensor from its experts' stacked [N, ...] deltas."""
    flat = deltas.reshape(len(deltas), -1)
    changed = flat.abs() > p.epsilon
    contributors = changed.sum(dim=0, keepdim=True)
    shared, unique = contributors > 1, contributors == 1
    kept = flat * changed
    unique_scale = torch.ones(len(deltas), 1)
    if p.variant == "ram_plus":
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=p.epsilon)
        unique_scale = (1 + p.r * rho.clamp(min=0, max=p.alpha)).unsqueeze(-1)
    merged = kept * unique * unique_scale.to(kept.device) + kept * shared / contributors.clamp(min=1)
    return merged.sum(dim=0).reshape(deltas.shape[1:])


@method("ram", params=RamParams, category="merging",
        properties=Properties(one_expert={"epsilon": 0.0}, quick={"variant": "ram_plus", "epsilon": 0.05},
                              why="no scaling factor"))
def ram(ctx: FusionContext, p: RamParams):
    experts = ctx.experts
    return map_entries(ctx.base, lambda k, b: b.float() + ram_delta(stack(experts, k) - b.float(), p))

