"""DELLA-merging: magnitude-aware random drop (MAGPRUNE), then elect signs and fuse.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024. arXiv:2406.11617

MAGPRUNE: within each row of every task-vector tensor (1-D tensors: the whole tensor),
entries are ranked by magnitude; the drop probability falls linearly with rank from
drop_rate + epsilon/2 (smallest) to drop_rate - epsilon/2 (largest), so the mean rate is
drop_rate; survivors are rescaled by 1/(1 - p_i). Then TIES's sign election and disjoint
mean (shared with methods/ties_merging.py), and theta = theta_pre + lambda * merged.
Masks come from the run's seed. Defaults (drop 0.5, epsilon 0.1, lambda 1.0) are
mid-range values of the paper's sweeps, not tuned here.
"""

import torch
from pydantic import Field, model_validator

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods.ties_merging import elect_and_merge


class DellaParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0)
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="mean drop probability")
    epsilon: float = Field(0.1, ge=0.0, lt=1.0, description="spread of drop probabilities across magnitudes")

    @model_validator(mode="after")
    def probabilities_in_range(self):
        if self.drop_rate - self.epsilon / 2 < 0 or self.drop_rate + self.epsilon / 2 >= 1:
            raise ValueError("drop_rate +- epsilon/2 must stay within [0, 1)")
        return self


def drop_probabilities(t: torch.Tensor, drop_rate: float, epsilon: float) -> torch.Tensor:
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    n = rows.shape[1]
    rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()  # 0 = smallest magnitude
    frac = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    return (drop_rate + epsilon / 2 - epsilon * frac).view_as(t)


def magprune(t: torch.Tensor, drop_rate: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    p = drop_probabilities(t, drop_rate, epsilon)
    keep = torch.rand(t.shape, generator=generator).to(t.device) >= p  # CPU draws: the same on every device
    return t * keep / (1 - p)


@method("della", params=DellaParams, category="merging", stochastic=True,
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              one_expert={"drop_rate": 0.0, "epsilon": 0.0, "scaling_factor": 1.0},
                              order_invariant=False, why="masks are drawn expert by expert from one seeded generator"))
def della(ctx: FusionContext, p: DellaParams):
    g = ctx.generator()
    pruned = [{k: magprune(v, p.drop_rate, p.epsilon, g) for k, v in tv.items()} for tv in ctx.task_vectors()]
    delta = {k: elect_and_merge(torch.stack([tv[k] for tv in pruned]), "mean") for k in pruned[0]}
    return apply_delta(ctx.base, delta, p.scaling_factor)
