"""Breadcrumbs-TIES: Model Breadcrumbs' outlier-and-small masks, then TIES' sign election.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024. arXiv:2312.06795 ; combined with TIES' sign consensus (Yadav et al.,
NeurIPS 2023, arXiv:2306.01708) as mergekit 0.1.5's `breadcrumbs_ties`.

Per tensor of every task vector, the gamma fraction of largest-magnitude entries and then
enough of the smallest are dropped to keep the density fraction (fewer outliers are
dropped when density + gamma > 1); the sign of each entry is elected by the summed
masked deltas (a sum of zero elects +), disagreeing entries are dropped, and the rest are
summed (averaged over the agreeing experts with normalize). theta = theta_pre + lambda *
that. Every expert weighs 1. Defaults are the paper's recommended masks as
methods/breadcrumbs.py uses them (85% small and 1% large entries dropped: density 0.14,
gamma 0.01) with task arithmetic's lambda 0.3 for a sum.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, method
from harness.registry import Properties
from methods._common import SparsifiedSumParams, l1_rescaled, sparsified_sum
from methods.breadcrumbs import magnitude_band


class BreadcrumbsTiesParams(SparsifiedSumParams):
    density: float = Field(0.14, gt=0.0, le=1.0, description="fraction of each tensor's entries kept")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest-magnitude entries dropped")


def outlier_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers mask: int(density * n) entries kept, int(gamma * n)
    largest dropped (fewer if both do not fit), the rest of the dropped ones the smallest."""
    n = t.numel()
    kept = int(density * n)
    smallest = max(0, n - kept - int(gamma * n))
    return magnitude_band(t, smallest, n - smallest - kept)


def sparsify(t: torch.Tensor, p: BreadcrumbsTiesParams) -> torch.Tensor:
    if p.density >= 1:
        return t
    keep = outlier_mask(t, p.density, p.gamma).to(t.dtype)
    return l1_rescaled(t, keep) if p.rescale else t * keep


@method("breadcrumbs_ties", params=BreadcrumbsTiesParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"density": 1.0, "scaling_factor": 1.0},
                              quick={"density": 0.5}))
def breadcrumbs_ties(ctx: FusionContext, p: BreadcrumbsTiesParams):
    return sparsified_sum(ctx, lambda t: sparsify(t, p), sign_consensus=True, p=p)
