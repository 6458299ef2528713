"""Task-wise AdaMerging: one merging coefficient per task vector, learned at test time.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. arXiv:2310.02575
theta = theta_0 + sum_t lambda_t tau_t, lambda trained by entropy minimisation on
unlabeled test inputs (see methods/_adamerging.py for the defaults and their sources).
"""

from harness.api import FusionContext, method
from harness.registry import Properties
from methods._adamerging import AdaMergingParams, adamerging


class TaskWiseAdaMergingParams(AdaMergingParams):
    pass


@method("adamerging_taskwise", params=TaskWiseAdaMergingParams, category="merging", data="unlabeled_test",
        trains=True, stochastic=True,
        properties=Properties(scaling_zero={"init_values": 0.0, "max_steps": 0},
                              one_expert={"init_values": 1.0, "max_steps": 0},
                              quick={"max_steps": 3, "batch_size": 8, "lr": 0.05}))
def adamerging_taskwise(ctx: FusionContext, params: TaskWiseAdaMergingParams):
    return adamerging(ctx, params, layer_wise=False)
