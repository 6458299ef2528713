"""Simple averaging of the experts' parameters.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022. arXiv:2203.05482
"""

from harness.api import FusionContext, method
from harness.registry import NoParams, Properties
from harness.tensors import map_keys, mean


@method("simple_average", params=NoParams, category="merging",
        properties=Properties(one_expert={}, why="an average has no scaling factor"))
def simple_average(ctx: FusionContext, params: NoParams):
    experts = ctx.experts
    return map_keys(ctx.base, lambda k: mean(experts, k))
