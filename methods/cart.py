"""CART: centered task arithmetic, low-rank task vectors around the weight average.

Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. arXiv:2412.12153 ;
follows the authors' CART merge (github.com/JH-GEECS/CART, src/merging.py).

The origin moves to the average theta_avg = theta_pre + (1/T) sum_t tau_t; each expert's
centered task vector theta_t - theta_avg is replaced, in its attention and MLP weight
matrices (2-D entries whose name holds 'attn' or 'mlp' and neither 'ln' nor 'bias', the
authors' rule), by its best rank-k approximation, k = max(1, int(rank_ratio * min(rows,
cols))); other entries keep it whole. theta = theta_avg + prior * sum_t of them.
Defaults are the authors' eight-task ViT-B/32 configuration (prior 2.0, rank ratio 0.12).
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack


class CartParams(Params):
    prior: float = Field(2.0, ge=0.0, le=10.0, description="scaling of the summed low-rank centered task vectors")
    rank_ratio: float = Field(0.12, ge=0.0, le=1.0, description="fraction of singular values kept per matrix")


def low_rank_entry(key: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def truncate(m: torch.Tensor, rank_ratio: float) -> torch.Tensor:
    """The best rank-max(1, int(rank_ratio * r)) approximation of m (zero at ratio 0, as the authors')."""
    if rank_ratio == 0.0:
        return torch.zeros_like(m)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = s.shape[0] if rank_ratio == 1.0 else max(1, int(rank_ratio * s.shape[0]))
    return (u[:, :k] * s[:k]) @ vh[:k, :]


@method("cart", params=CartParams, category="merging",
        properties=Properties(one_expert={}, why="prior 0 is the experts' average, not the base"))
def cart(ctx: FusionContext, p: CartParams):
    experts = ctx.experts

    def merge(key, base):
        ref = base.float()
        average = ref + (stack(experts, key) - ref).sum(dim=0) / len(experts)
        centered = [e[key].float() - average for e in experts]
        if low_rank_entry(key, ref):
            centered = [truncate(c, p.rank_ratio) for c in centered]
        elif p.rank_ratio == 0.0:
            centered = [torch.zeros_like(c) for c in centered]
        return average + p.prior * torch.stack(centered).sum(dim=0)

    return map_entries(ctx.base, merge)
