"""DOGE TA: task arithmetic with a shared correction, optimised by projected gradient descent.

Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent",
2025. arXiv:2501.01230 ; follows fusion-bench 0.2.33's DOGE_TA_Algorithm.

On the weight matrices of the encoder (entries named 'encoder' and 'weight', not
'layer_norm': fusion-bench's rule for CLIP; others keep the base's value), each task vector
tau_i of layer l gets the coefficient lambda_il = lamda / ||tau_il||. A correction delta_l,
shared by the tasks, minimises sum_j || sum_cols(tau_j * (tau_j - sum_i lambda_il (tau_i +
delta_l))) ||^2 by Adam (lr 1e-4, `steps` per layer: fusion-bench fixes 400), its gradient projected off the
shared subspace: the top 1/subspace of the left singular vectors of the concatenated top
1/T left singular vectors of each task's matrix. Each task then keeps the top K% of its
flattened task vector by magnitude, and the merged layer is sum_i lambda_il * mask_i *
(tau_il + delta_l). Defaults are fusion-bench's config (subspace 6, K 30, lamda 0.07).
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_keys, stack

LR = 1e-4  # fixed in fusion-bench's optimize_delta


class DogeTaParams(Params):
    lamda: float = Field(0.07, ge=0.0, le=10.0, description="a layer's coefficient times its task vector's norm")
    subspace: int = Field(6, ge=1, le=1024, description="the shared subspace is 1/subspace of the rank")
    K: float = Field(30.0, gt=0.0, lt=100.0, description="percent of each task vector's entries kept")
    steps: int = Field(400, ge=0, le=100_000, description="Adam steps per layer (fusion-bench fixes 400)")


def merged_entry(key: str, tensor_dim: int) -> bool:
    return "encoder" in key and "layer_norm" not in key and "weight" in key and tensor_dim == 2


def shared_subspace_projection(task_matrices: torch.Tensor, subspace: int) -> torch.Tensor:
    """P = U_k U_k^T, U_k the top rank/subspace left singular vectors of the tasks' top left singular vectors."""
    n_tasks = len(task_matrices)
    columns = None
    for i, m in enumerate(task_matrices):
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        columns = torch.zeros_like(u) if columns is None else columns
        r = int(s.shape[0] / n_tasks)
        columns[:, i * r:(i + 1) * r] = u[:, :r]
    shared = torch.linalg.svd(columns, full_matrices=False)[0][:, :int(s.shape[0] / subspace)]
    return shared @ shared.T


def loss(task_matrices: torch.Tensor, delta: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    scaled_sum = (task_matrices * coefficients.view(-1, 1, 1)).sum(dim=0)
    scaled_delta = (delta.unsqueeze(0) * coefficients.view(-1, 1, 1)).sum(dim=0)
    total = 0.0
    for v in task_matrices:
        total += (-v * scaled_sum - v * scaled_delta + v * v).sum(dim=1).pow(2).sum()
    return total


def optimise_delta(task_matrices: torch.Tensor, coefficients: torch.Tensor, projection: torch.Tensor,
                   steps: int) -> torch.Tensor:
    delta = torch.nn.Parameter(torch.zeros_like(task_matrices[0]))
    optimizer = torch.optim.Adam([delta], lr=LR)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss(task_matrices, delta, coefficients).backward()
            delta.grad.sub_(projection @ delta.grad)
            optimizer.step()
    return delta.detach()


def top_k_masks(flat: torch.Tensor, percent: float) -> torch.Tensor:
    """Per row of [T, D], entries at least as large in magnitude as its top percent% (ties kept)."""
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * percent / 100), dim=1, keepdim=True).values
    return flat.abs() >= kth


@method("doge_ta", params=DogeTaParams, category="merging", trains=True,
        properties=Properties(scaling_zero={"lamda": 0.0}, quick={"steps": 20},
                              why="one expert: the top-K mask and the norm-scaled coefficient change it"))
def doge_ta(ctx: FusionContext, p: DogeTaParams):
    base, experts = ctx.base, ctx.experts
    keys = sorted(k for k in base.keys() if merged_entry(k, base[k].dim()))
    deltas = {k: stack(experts, k) - base[k].float() for k in keys}
    coefficients = {k: torch.stack([p.lamda / torch.norm(t) for t in deltas[k]]) for k in keys}
    corrections = {k: optimise_delta(deltas[k], coefficients[k], shared_subspace_projection(deltas[k], p.subspace),
                                     p.steps) for k in keys}
    masks = top_k_masks(torch.cat([deltas[k].flatten(1) for k in keys], dim=1), p.K) if keys else None
    merged, offset = {}, 0
    for k in keys:
        size = deltas[k][0].numel()
        mask = masks[:, offset:offset + size].view_as(deltas[k])
        merged[k] = ((deltas[k] + corrections[k]) * mask * coefficients[k].view(-1, 1, 1)).sum(dim=0)
        offset += size
    return map_keys(base, lambda k: base[k].float() + merged[k] if k in merged else base[k].float())
