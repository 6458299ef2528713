"""Layer-wise AdaMerging: one merging coefficient per task vector and per weight tensor.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. arXiv:2310.02575
theta_l = theta_0,l + sum_t lambda_t,l tau_t,l for every floating weight tensor l (the
paper's code and FusionBench give each parameter tensor its own coefficient), lambda
trained by entropy minimisation on unlabeled test inputs (see methods/_adamerging.py).
"""

from harness.api import FusionContext, method
from harness.registry import Properties
from methods._adamerging import AdaMergingParams, adamerging


class LayerWiseAdaMergingParams(AdaMergingParams):
    pass


@method("adamerging_layerwise", params=LayerWiseAdaMergingParams, category="merging", data="unlabeled_test",
        trains=True, stochastic=True,
        properties=Properties(scaling_zero={"init_values": 0.0, "max_steps": 0},
                              one_expert={"init_values": 1.0, "max_steps": 0},
                              quick={"max_steps": 3, "batch_size": 8, "lr": 0.05}))
def adamerging_layerwise(ctx: FusionContext, params: LayerWiseAdaMergingParams):
    return adamerging(ctx, params, layer_wise=True)
