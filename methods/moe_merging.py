"""MoE-based merging: experts' MLPs as a mixture, everything else merged by task arithmetic.

Tang et al., FusionBench "MoE-based merging" (mixtral_moe_merging), after Komatsuzaki
et al., "Sparse Upcycling", ICLR 2023. arXiv:2212.05055 ; FusionBench arXiv:2406.03280

Like moe_upscaling, but the shared (non-MLP) weights are task arithmetic of the experts,
theta_pre + lambda * sum_t tau_t (lambda 0.3), instead of the pre-trained ones. The router
is zero-initialised (no data): all experts weigh the same unless top_k is set.
"""

from typing import Optional

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.moe import upscale_mlps
from harness.tensors import apply_delta
from methods._common import sum_task_vectors


class MoEMergingParams(Params):
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0, description="task arithmetic lambda for shared weights")
    top_k: Optional[int] = Field(None, ge=1, le=1024, description="experts per token; None = all")


@method("moe_merging", params=MoEMergingParams, category="mixing", output="larger")
def moe_merging(ctx: FusionContext, p: MoEMergingParams):
    shared = apply_delta(ctx.base, sum_task_vectors(ctx.task_vectors()), p.scaling_factor)
    return upscale_mlps(ctx, shared, p.top_k)
