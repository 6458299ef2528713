"""Depth upscaling (SOLAR): a deeper model from stacked copies of a model's blocks.

Kim et al., "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective
Depth Up-Scaling", 2023. arXiv:2312.15166

The source model (task arithmetic of the experts by default, or the pre-trained model)
has n blocks; the upscaled model's blocks are copies of source blocks at layer_indices,
by default SOLAR's [0, n - m) followed by [m, n) with m = n // 4 (SOLAR: n 32, m 8).
config.num_hidden_layers is updated. SOLAR continues pre-training afterwards; here no
data is used, so this measures the stacked model as built.
"""

import copy
from typing import Annotated, Literal, Optional

from pydantic import Field
from torch import nn

from harness.api import FusionContext, Params, method
from harness.moe import encoder_layers, set_submodule
from harness.tensors import apply_delta
from methods._common import sum_task_vectors


class DepthUpscalingParams(Params):
    source: Literal["task_arithmetic", "base"] = "task_arithmetic"
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0, description="lambda when source=task_arithmetic")
    layer_indices: Optional[list[Annotated[int, Field(ge=0, le=10_000)]]] = Field(
        None, max_length=1024, description="source blocks to stack; None = SOLAR's")


def solar_indices(n: int) -> list[int]:
    m = n // 4
    return list(range(0, n - m)) + list(range(m, n))


@method("depth_upscaling", params=DepthUpscalingParams, category="mixing", output="larger")
def depth_upscaling(ctx: FusionContext, p: DepthUpscalingParams):
    state = (ctx.base if p.source == "base"
             else apply_delta(ctx.base, sum_task_vectors(ctx.task_vectors()), p.scaling_factor))
    model = ctx.module(state)
    name, layers = encoder_layers(model)
    indices = solar_indices(len(layers)) if p.layer_indices is None else p.layer_indices
    if not indices or not all(0 <= i < len(layers) for i in indices):
        raise ValueError(f"layer_indices must name blocks 0..{len(layers) - 1}, got {indices}")
    set_submodule(model, name, nn.ModuleList([copy.deepcopy(layers[i]) for i in indices]))
    model.config.num_hidden_layers = len(indices)
    return model.eval()
