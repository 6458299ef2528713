"""Model Breadcrumbs: mask each layer's tiny and outlier task-vector entries, then add.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024. arXiv:2312.06795

Per tensor of every task vector, the drop_small fraction of entries with the smallest
magnitude and the drop_large fraction with the largest are zeroed; the masked task
vectors are summed and scaled (theta = theta_pre + lambda * sum_t mask_t * tau_t).
Defaults are in the range the paper recommends (about 85% of small entries and 1% of
outliers removed) with FusionBench's task-arithmetic lambda of 0.3.
"""

import torch
from pydantic import Field, model_validator

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods._common import sum_task_vectors


class BreadcrumbsParams(Params):
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0)
    drop_small: float = Field(0.85, ge=0.0, lt=1.0, description="fraction of smallest-magnitude entries removed")
    drop_large: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest-magnitude entries removed")

    @model_validator(mode="after")
    def leaves_something(self):
        if self.drop_small + self.drop_large >= 1.0:
            raise ValueError("drop_small + drop_large must be below 1")
        return self


def breadcrumbs_mask(t: torch.Tensor, drop_small: float, drop_large: float) -> torch.Tensor:
    """Keep the entries ranked (by |t|) in [n*drop_small, n - n*drop_large); ties broken by position."""
    n = t.numel()
    return magnitude_band(t, int(n * drop_small), int(n * drop_large))


def magnitude_band(t: torch.Tensor, n_small: int, n_large: int) -> torch.Tensor:
    """Mask dropping the n_small smallest and the n_large largest entries of t by magnitude
    (ties broken by position)."""
    n = t.numel()
    rank = torch.empty(n, dtype=torch.long, device=t.device)
    rank[t.abs().flatten().argsort(stable=True)] = torch.arange(n, device=t.device)
    keep = (rank >= n_small) & (rank < n - n_large)
    return keep.view_as(t)


@method("breadcrumbs", params=BreadcrumbsParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              one_expert={"drop_small": 0.0, "drop_large": 0.0, "scaling_factor": 1.0}))
def breadcrumbs(ctx: FusionContext, p: BreadcrumbsParams):
    masked = [{k: v * breadcrumbs_mask(v, p.drop_small, p.drop_large) for k, v in tv.items()}
              for tv in ctx.task_vectors()]
    return apply_delta(ctx.base, sum_task_vectors(masked), p.scaling_factor)
