"""Iso-C: isotropic merging in the common subspace — flatten the summed task matrix's spectrum.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025. arXiv:2502.04959

For every 2-D entry, Delta = sum_t tau_t = U S V^T is replaced by U (mean(S) I) V^T so
every direction of the common subspace gets the same weight; other entries take the
mean task vector. theta = theta_pre + alpha * merged with alpha = 1.0 (FusionBench's
default; the paper tunes alpha on validation data). One expert is not reproduced: its
own spectrum is flattened too.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods._common import merge_matrices


class IsoCParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="alpha")


def isotropic(m: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s.mean() * (u @ vh)


@method("iso_c", params=IsoCParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              why="flattening the spectrum changes even one expert"))
def iso_c(ctx: FusionContext, p: IsoCParams):
    merged = merge_matrices(ctx.task_vectors(), lambda mats: isotropic(torch.stack(mats).sum(0)))
    return apply_delta(ctx.base, merged, p.scaling_factor)
