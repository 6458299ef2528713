"""SMILE: sparse mixture of low-rank experts, built zero-shot from SVDs of task vectors.

Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
Pre-trained Foundation Models", 2024. arXiv:2408.10174

Every linear layer whose experts differ from the pre-trained one becomes
W_pre x + sum_{i in top_k} w_i(x) (U_i,k S_i,k V_i,k^T x + db_i), with routing scores
||V_i,gate_k^T x|| (no training, no data). Other modules stay pre-trained. Defaults are
FusionBench's smile_upscaling config (gate_k 1, k 128 truncated to the layer's rank,
top_k 1). Matches fusion_bench.models.smile_moe.SmileMoELinear (routing_use_diff=True).
"""

import copy

import torch
from pydantic import Field
from torch import nn

from harness.api import FusionContext, Params, method
from harness.moe import SmileMoELinear, set_submodule


class SmileParams(Params):
    gate_k: int = Field(1, ge=1, le=4096, description="singular vectors per expert used for routing")
    k: int = Field(128, ge=1, le=65536, description="rank of each low-rank expert")
    top_k: int = Field(1, ge=1, le=1024, description="experts per token")


@method("smile_upscaling", params=SmileParams, category="mixing", output="larger")
@torch.no_grad()
def smile_upscaling(ctx: FusionContext, p: SmileParams):
    model = ctx.module(ctx.base)
    experts = [ctx.module(e) for e in ctx.experts]
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        finetuned = [e.get_submodule(name) for e in experts]
        if all(torch.equal(f.weight, layer.weight) for f in finetuned):
            continue  # nothing to route to (FusionBench skips such layers too)
        set_submodule(model, name, SmileMoELinear(copy.deepcopy(layer), finetuned, p.gate_k, p.k, p.top_k))
    return model.eval()
