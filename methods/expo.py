"""ExPO: extrapolate from the pre-trained model past the (averaged) fine-tuned one.

Zheng et al., "Weak-to-Strong Extrapolation Expedites Alignment", 2024. arXiv:2404.16792 ;
follows fusion-bench 0.2.33's ExPOAlgorithm.

theta = theta_ft + alpha * (theta_ft - theta_pre), where theta_ft is the one expert, or the
plain average of several (fusion-bench averages them first); equivalently theta_pre +
(1 + alpha) * the mean task vector. alpha = 0.1 is fusion-bench's config.
"""

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_keys, mean


class ExpoParams(Params):
    extrapolation_factor: float = Field(0.1, ge=-1.0, le=10.0, description="alpha")


@method("expo", params=ExpoParams, category="merging",
        properties=Properties(one_expert={"extrapolation_factor": 0.0},
                              why="it extrapolates from the experts' average: alpha = -1 returns the base "
                                  "only up to rounding"))
def expo(ctx: FusionContext, p: ExpoParams):
    base, experts = ctx.base, ctx.experts

    def merge(key):
        averaged = mean(experts, key)
        return averaged + p.extrapolation_factor * (averaged - base[key].float())

    return map_keys(base, merge)
