"""Max-model predictor: keep every expert and take, per class, the largest logit of any expert.

Tang et al., "FusionBench: A Comprehensive Benchmark of Deep Model Fusion", 2024. arXiv:2406.03280
Its MaxModelPredictor ensemble baseline.
"""

from harness.api import Ensemble, FusionContext, method
from harness.registry import NoParams


@method("max_model_predictor", params=NoParams, category="ensemble", output="ensemble")
def max_model_predictor(ctx: FusionContext, params: NoParams):
    return Ensemble(members=ctx.experts, reduce="max")
