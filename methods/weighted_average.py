"""Weighted average of the experts' parameters: theta = sum_t w_t theta_t.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022. arXiv:2111.09832
They use it as the isotropic-merging baseline; FusionBench's WeightedAverageAlgorithm
normalizes the weights to sum to one by default, as here.
"""

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries, stack
from methods._weights import task_weights


class WeightedAverageParams(Params):
    weights: dict[str, float] | None = Field(None, description="weight per task name; None = uniform")
    normalize: bool = Field(True, description="rescale the weights to sum to one")


@method("weighted_average", params=WeightedAverageParams, category="merging",
        properties=Properties(one_expert={}, why="an average has no scaling factor",
                              quick={"weights": {"alpha": 1.0, "beta": 2.0, "gamma": 0.5}}))
def weighted_average(ctx: FusionContext, params: WeightedAverageParams):
    experts = ctx.experts
    w = task_weights(ctx.tasks, params.weights, params.normalize)

    def merge(key, base_tensor):
        stacked = stack(experts, key)
        return (stacked * stacked.new_tensor(w).view(-1, *[1] * (stacked.dim() - 1))).sum(0)

    return map_entries(ctx.base, merge)
