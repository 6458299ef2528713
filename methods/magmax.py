"""MagMax: for every parameter, keep the task vector entry of largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024. arXiv:2407.06322

theta = theta_pre + lambda * tau_max, tau_max[j] = tau_t[j] with t = argmax_t |tau_t[j]|.
Equal magnitudes go to the later expert (FusionBench's `>=` fold), so the result depends
on expert order only at exact ties. lambda = 0.5 is FusionBench's default.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta


class MagMaxParams(Params):
    scaling_factor: float = Field(0.5, ge=0.0, le=10.0)


def max_magnitude(task_vectors):
    merged = dict(task_vectors[0])
    for tv in task_vectors[1:]:
        merged = {k: torch.where(v.abs() >= merged[k].abs(), v, merged[k]) for k, v in tv.items()}
    return merged


@method("magmax", params=MagMaxParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"scaling_factor": 1.0}))
def magmax(ctx: FusionContext, p: MagMaxParams):
    return apply_delta(ctx.base, max_magnitude(ctx.task_vectors()), p.scaling_factor)
