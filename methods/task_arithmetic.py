"""Task arithmetic: add the scaled sum of task vectors to the pre-trained model.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. arXiv:2212.04089
theta = theta_pre + lambda * sum_t (theta_t - theta_pre); FusionBench uses lambda = 0.3.
"""

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import delta_sum, map_keys


class TaskArithmeticParams(Params):
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0)


@method("task_arithmetic", params=TaskArithmeticParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"scaling_factor": 1.0},
                              quick={"scaling_factor": 0.3}))
def task_arithmetic(ctx: FusionContext, params: TaskArithmeticParams):
    base, experts, lam = ctx.base, ctx.experts, params.scaling_factor

    # theta_pre + lambda * sum of task vectors, computed in place (the same bits as out of place)
    return map_keys(base, lambda key: delta_sum(experts, key, base, then=lambda t, ref: t.mul_(lam).add_(ref)))
