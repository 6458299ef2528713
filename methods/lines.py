"""LiNeS: layer-increasing network scaling of the merged task vector (here on task arithmetic).

Wang, Dimitriadis et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging", 2024. arXiv:2410.17146 ; follows the authors' LiNeS_scaling
and multi-task setting (github.com/wang-kee/LiNeS, src/eval/eval.py).

The multi-task vector tau = sum_t tau_t (task arithmetic's) is scaled block by block:
entries of residual block l of L take lambda_l = alpha + beta * l / (L - 1), entries outside
the blocks (embeddings, final norm, heads) take alpha. alpha = (||sum_t tau_t||_1 /
||tau||_1) / T, which for task arithmetic's sum is 1/T (the authors' rule for merging);
beta is the hyperparameter they select on validation from 0.1, 0.2, ..., 1.0.
theta = theta_pre + LiNeS(tau). An entry's block is the first integer component of its
dotted name (`encoder.layers.3.mlp.fc1.weight` is block 3) and L is one more than the largest
block index: the authors match `.{l}.` for l = 0, 1, ... in turn, which agrees on names with
one integer component (the CLIP, ViT and T5 layouts) and can differ on names with several.
"""

import re

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import delta_sum, map_keys

BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class LinesParams(Params):
    beta: float = Field(0.5, ge=0.0, le=10.0, description="extra scaling of the last block over the first")
    alpha: float | None = Field(None, ge=0.0, le=10.0, description="scaling of the first block; default 1/T")


def block_index(key: str) -> int | None:
    found = BLOCK.search(key)
    return None if found is None else int(found.group(1))


def layer_scalings(keys, alpha: float, beta: float) -> dict[str, float]:
    """alpha + beta * l / (L - 1) for an entry of block l of L; alpha outside the blocks."""
    blocks = {k: block_index(k) for k in keys}
    last = max((b for b in blocks.values() if b is not None), default=0)
    return {k: alpha if b is None else alpha + beta * (b / last if last > 0 else 0.0) for k, b in blocks.items()}


@method("lines", params=LinesParams, category="merging",
        properties=Properties(scaling_zero={"alpha": 0.0, "beta": 0.0}, one_expert={"alpha": 1.0, "beta": 0.0}))
def lines(ctx: FusionContext, p: LinesParams):
    base, experts = ctx.base, ctx.experts
    alpha = 1 / len(experts) if p.alpha is None else p.alpha
    scale = layer_scalings(list(base.keys()), alpha, p.beta)
    return map_keys(base, lambda key: delta_sum(experts, key, base,
                                                then=lambda t, ref: t.mul_(scale[key]).add_(ref)))
