"""Iso-CTS: isotropic merging with common and task-specific subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025. arXiv:2502.04959

For every 2-D entry (r = min(rows, cols)): the top k_c singular directions of the summed
task matrix form the common subspace (k_c ~ common_space_fraction * r, adjusted so the
rest divides evenly among the T tasks); each task contributes the top (r - k_c) / T
directions of its matrix with the common subspace projected out. The concatenated
bases are orthogonalised and every direction gets the mean singular value (isotropic).
Other entries take the mean task vector. Defaults from FusionBench / the paper:
alpha = 1.0, common_space_fraction = 0.8. Follows FusionBench's iso_cts.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods._common import merge_matrices, orthogonalize


class IsoCtsParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="alpha")
    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0)


def iso_cts_matrix(per_task: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    r, n_tasks = min(per_task[0].shape), len(per_task)
    specific_total = round((r - int(r * common_fraction)) / n_tasks) * n_tasks
    k_common = r - specific_total
    per_task_k = specific_total // n_tasks
    u, s, vh = torch.linalg.svd(torch.stack(per_task).sum(0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :k_common], s[:k_common], vh[:k_common]
    us, ss, vhs = [], [], []
    for m in per_task:
        ut, st, vht = torch.linalg.svd(m - u_c @ (u_c.T @ m), full_matrices=False)
        us.append(ut[:, :per_task_k]), ss.append(st[:per_task_k]), vhs.append(vht[:per_task_k])
    u_all = torch.cat(us + [u_c], dim=1)
    s_all = torch.cat(ss + [s_c])
    vh_all = torch.cat(vhs + [vh_c], dim=0)
    return s_all.mean() * (orthogonalize(u_all) @ orthogonalize(vh_all))


@method("iso_cts", params=IsoCtsParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              why="flattening the spectrum changes even one expert"))
def iso_cts(ctx: FusionContext, p: IsoCtsParams):
    merged = merge_matrices(ctx.task_vectors(), lambda mats: iso_cts_matrix(mats, p.common_space_fraction))
    return apply_delta(ctx.base, merged, p.scaling_factor)
