"""A fused result ready to predict: one module, or several whose logits combine. Below evaluation and the
families, both of which combine members' outputs (a family that predicts by itself, e.g. generated text,
reduces its members' logits with the same rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Predictor:
    """A fused model ready to predict: one module, or several whose logits combine.
    member_keys: which checkpoint each member is (None when it was made in this run), so
    that a member's outputs on a test set are computed once for every ensemble and reference."""
    members: list[nn.Module]
    weights: list[float] | None = None
    reduce: str = "mean"
    member_keys: list[str | None] | None = None

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for m in self.members:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total


def combine(predictor: Predictor, member_logits: Tensor) -> Tensor:
    """Reduce stacked member logits [members, batch, ...] to one prediction's logits."""
    if predictor.reduce == "max":
        return member_logits.max(dim=0).values
    if predictor.weights is not None:
        w = torch.tensor(predictor.weights, device=member_logits.device)
        return (w.view(-1, *[1] * (member_logits.dim() - 1)) * member_logits).sum(0)
    return member_logits.mean(0)
