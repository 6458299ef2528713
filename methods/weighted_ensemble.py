"""Weighted ensemble: keep every expert and take a weighted mean of their logits.

Sagi & Rokach, "Ensemble learning: A survey", WIREs DMKD 8(4), 2018. doi:10.1002/widm.1249
FusionBench's WeightedEnsembleAlgorithm: weights default to uniform and are normalized
to sum to one (normalize=true).
"""

from pydantic import Field

from harness.api import Ensemble, FusionContext, Params, method
from methods._weights import task_weights


class WeightedEnsembleParams(Params):
    weights: dict[str, float] | None = Field(None, description="weight per task name; None = uniform")
    normalize: bool = Field(True, description="rescale the weights to sum to one")


@method("weighted_ensemble", params=WeightedEnsembleParams, category="ensemble", output="ensemble")
def weighted_ensemble(ctx: FusionContext, params: WeightedEnsembleParams):
    return Ensemble(members=ctx.experts, weights=task_weights(ctx.tasks, params.weights, params.normalize))
