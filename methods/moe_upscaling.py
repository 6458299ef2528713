"""MoE upscaling: every block's MLP becomes a mixture of the experts' MLPs (sparse upcycling).

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023. arXiv:2212.05055

Attention, embeddings and norms are the pre-trained model's; each MLP is replaced by a
token-routed MoE whose experts are the fine-tuned models' MLPs. No data is used, so the
router is zero-initialised: every expert gets the same weight (top_k=None, the default,
keeps them all; a smaller top_k on an untrained router keeps the first experts in task
order, which is why it is not the default). The paper trains the router afterwards.
"""

from typing import Optional

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.moe import upscale_mlps


class MoEUpscalingParams(Params):
    top_k: Optional[int] = Field(None, ge=1, le=1024, description="experts per token; None = all")


@method("moe_upscaling", params=MoEUpscalingParams, category="mixing", output="larger")
def moe_upscaling(ctx: FusionContext, p: MoEUpscalingParams):
    return upscale_mlps(ctx, ctx.base, p.top_k)
