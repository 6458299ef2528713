"""TSV-M: task singular vectors merging — low-rank per-task SVDs, decorrelated, summed.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025. arXiv:2412.00081

For every 2-D entry, each of the T task-vector matrices keeps its top int(r / T)
singular triplets (r = min(rows, cols)); the kept left and right singular vectors are
concatenated and replaced by their nearest orthonormal matrices (U V^T of their SVDs),
removing cross-task interference, and the merged matrix is U_perp diag(S) V_perp^T.
Other entries take the mean task vector. theta = theta_pre + alpha * merged, alpha = 1.0
(FusionBench's default). Follows FusionBench's compute_and_sum_svd_mem_reduction.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods._common import merge_matrices, orthogonalize


class TsvParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="alpha")


def tsv_merge_matrix(per_task: list[torch.Tensor]) -> torch.Tensor:
    svds = [torch.linalg.svd(m, full_matrices=False) for m in per_task]
    r = svds[0][1].shape[0]
    k = int(r / len(per_task))
    u = torch.zeros_like(svds[0][0])
    s = torch.zeros_like(svds[0][1])
    vh = torch.zeros_like(svds[0][2])
    for i, (ui, si, vhi) in enumerate(svds):
        u[:, i * k:(i + 1) * k] = ui[:, :k]
        s[i * k:(i + 1) * k] = si[:k]
        vh[i * k:(i + 1) * k, :] = vhi[:k, :]
    return orthogonalize(u) @ torch.diag(s) @ orthogonalize(vh)


@method("tsv_merging", params=TsvParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"scaling_factor": 1.0}))
def tsv_merging(ctx: FusionContext, p: TsvParams):
    return apply_delta(ctx.base, merge_matrices(ctx.task_vectors(), tsv_merge_matrix), p.scaling_factor)
