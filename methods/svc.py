"""SVC: singular value calibration of task arithmetic's merge, shrinking over-counted spectra.

"When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging", 2026.
arXiv:2602.05536 ; follows fusion-bench 0.2.33's SingularValueCalibrationArithmeticTask
(task arithmetic, then its vectorised subspace_consistency_spectral_calibration).

theta_m = theta_pre + lambda * sum_t tau_t (task arithmetic). For every 2-D entry, with
Delta = theta_m - theta_pre = U S V^T: each task's response along the r-th left singular
vector is a_rt = u_r^T tau_t, the merge's a_r = u_r^T Delta; s_rt = <a_r, a_rt> / ||a_rt||^2
says how much the merge over-counts task t there (> 1: more than the task itself; an empty
response counts as alpha); the r-th singular value is scaled by gamma_r = T / sum_t
max(alpha, s_rt). Other entries keep task arithmetic's value. Computed in float64, as
fusion-bench does. Defaults are fusion-bench's config (lambda 0.3, alpha 0.1). Only task
arithmetic's merge is calibrated here; fusion-bench also calibrates other base merges.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack


class SvcParams(Params):
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0, description="task arithmetic's lambda")
    alpha: float = Field(0.1, ge=0.0, le=10.0, description="floor of each task's over-counting coefficient")


def calibrate(delta: torch.Tensor, task_matrices: torch.Tensor, alpha: float) -> torch.Tensor:
    """The merged [m, n] delta with its singular values scaled by gamma_r, from [T, m, n] task matrices."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    basis = u.T.contiguous()
    merged_responses = basis @ delta
    task_responses = torch.einsum("rm,kmn->rkn", basis, task_matrices)
    squared = (task_responses * task_responses).sum(dim=-1).clamp_min(1e-12)
    coefficients = torch.einsum("rn,rkn->rk", merged_responses, task_responses) / squared
    coefficients = torch.nan_to_num(coefficients, nan=alpha, neginf=alpha)
    gamma = len(task_matrices) / coefficients.clamp(min=alpha).sum(dim=1)
    return (u * (gamma * s).unsqueeze(0)) @ vh


@method("svc", params=SvcParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"scaling_factor": 1.0},
                              quick={"alpha": 0.5}))
def svc(ctx: FusionContext, p: SvcParams):
    experts = ctx.experts

    def merge(key, base):
        ref = base.double()
        task_matrices = stack(experts, key).double() - ref
        delta = p.scaling_factor * task_matrices.sum(dim=0)
        if base.dim() == 2:
            delta = calibrate(delta, task_matrices, p.alpha)
        return (ref + delta).float()

    return map_entries(ctx.base, merge)
