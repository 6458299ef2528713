"""DELLA-linear: MAGPRUNE's rank-graded random drop of each task vector, then a plain sum.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024. arXiv:2406.11617 ; in mergekit 0.1.5's definition (`della_linear`).

Per tensor and expert, entries are ranked by magnitude along dim 1 (a 1-D tensor as one
row); each is kept with probability density - epsilon + 2 * epsilon * r, r its rank scaled
to [0, 1] (so larger entries survive more often), drawn from the run's seed; the survivors
are rescaled so the tensor keeps its L1 norm (rescale; mergekit's default). The sparsified
task vectors are summed (averaged with normalize) with no sign election, and
theta = theta_pre + lambda * that. This is mergekit's definition, which differs from the
paper's in methods/della.py (keep probabilities spread +-epsilon, not +-epsilon/2; an L1
rescale, not 1/(1-p_i); no sign election). Every expert weighs 1. Defaults: density 0.5 as
methods/della.py, mergekit's epsilon 0.15, lambda 0.3 (task arithmetic's, for a sum).
"""

import torch
from pydantic import Field, model_validator

from harness.api import FusionContext, method
from harness.registry import Properties
from methods._common import SparsifiedSumParams, l1_rescaled, sparsified_sum


class DellaLinearParams(SparsifiedSumParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="mean keep probability")
    epsilon: float = Field(0.15, ge=0.0, lt=1.0, description="keep probabilities span density +- epsilon")
    rescale: bool = Field(True, description="rescale survivors to the tensor's L1 norm (mergekit's default here)")

    @model_validator(mode="after")
    def probabilities_in_range(self):
        if self.density < 1 and (self.density + self.epsilon >= 1 or self.density - self.epsilon <= 0):
            raise ValueError("density +- epsilon must stay within (0, 1)")
        return self


def magprune(t: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator):
    """mergekit's della_magprune of one task-vector tensor."""
    if density >= 1:
        return t
    rows = t.unsqueeze(0) if t.dim() < 2 else t
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # a one-entry row (mergekit: 0/0, NaN) takes the lowest probability
    probs = density - epsilon + ((ranks - low) / (high - low).clamp(min=1)).clamp(0, 1) * 2 * epsilon
    keep = torch.bernoulli(probs.cpu(), generator=generator).to(t.device)  # CPU draws: the same on every device
    return (l1_rescaled(rows, keep) if rescale else rows * keep).reshape(t.shape)


@method("della_linear", params=DellaLinearParams, category="merging", stochastic=True,
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"density": 1.0, "scaling_factor": 1.0},
                              order_invariant=False, why="masks are drawn expert by expert from one seeded generator"))
def della_linear(ctx: FusionContext, p: DellaLinearParams):
    g = ctx.generator()
    return sparsified_sum(ctx, lambda t: magprune(t, p.density, p.epsilon, p.rescale, g), sign_consensus=False, p=p)
