"""WUDI merging: per linear layer, fit a merged task vector to each task vector's own row space.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025. arXiv:2503.08099 ; follows fusion-bench 0.2.33's
wudi_merging.

For every 2-D entry, starting from the sum of the task vectors, tau_m minimises
sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (a task's inputs lie near its task
vector's row space, so this bounds each task's interference without data) by Adam
(learning rate lr, no weight decay) for iter_num steps; other entries take the mean task
vector. theta = theta_pre + lambda * tau_m, lambda = 1 as in fusion-bench. Defaults are
fusion-bench's config (400 steps, lr 1e-5). Data-free, but an optimisation: about
iter_num times the cost of a batched matmul of the stacked task matrices per layer.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack


class WudiParams(Params):
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0, description="lambda")
    iter_num: int = Field(400, ge=0, le=100_000, description="Adam steps per linear layer")
    lr: float = Field(1e-5, gt=0.0, le=1.0)


def wudi_matrix(task_matrices: torch.Tensor, iter_num: int, lr: float) -> torch.Tensor:
    """The merged [out, in] task matrix from stacked [N, out, in] task matrices."""
    merged = torch.nn.Parameter(task_matrices.sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    squared_norms = task_matrices.reshape(len(task_matrices), -1).norm(p=2, dim=-1).square().view(-1, 1, 1)
    with torch.enable_grad():
        for _ in range(iter_num):
            interference = torch.matmul(merged.unsqueeze(0) - task_matrices, task_matrices.transpose(1, 2))
            loss = torch.sum(interference.square() / squared_norms)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return merged.detach()


@method("wudi", params=WudiParams, category="merging", trains=True,
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"iter_num": 20},
                              quick={"iter_num": 20}))
def wudi(ctx: FusionContext, p: WudiParams):
    experts = ctx.experts

    def merge(key, base):
        deltas = stack(experts, key) - base.float()
        merged = wudi_matrix(deltas, p.iter_num, p.lr) if base.dim() == 2 else deltas.mean(dim=0)
        return base.float() + p.scaling_factor * merged

    return map_entries(ctx.base, merge)
