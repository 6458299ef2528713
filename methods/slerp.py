"""SLERP: spherical linear interpolation between expert weights, tensor by tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
doi:10.1145/325165.325242 ; applied to model weights as in mergekit / FusionBench.

Two experts: theta = slerp(t, theta_1, theta_2) per tensor, falling back to linear
interpolation when the tensors are nearly colinear (|cos| > dot_threshold), as
FusionBench does. More than two experts: a running spherical mean, m_1 = theta_1,
m_i = slerp(1/i, m_{i-1}, theta_i) (t is ignored); unlike a Euclidean mean this depends
on expert order, which follows the suite's task order.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries
from methods._common import interpolate_all


class SlerpParams(Params):
    t: float = Field(0.5, ge=0.0, le=1.0, description="weight of the second expert (two experts only)")
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0)
    epsilon: float = Field(1e-8, gt=0.0)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float, eps: float) -> torch.Tensor:
    def unit(v):
        n = torch.linalg.norm(v)
        return v / n if n > eps else v
    dot = torch.sum(unit(v0) * unit(v1))
    if torch.abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(dot)
    return (torch.sin(theta - theta * t) * v0 + torch.sin(theta * t) * v1) / torch.sin(theta)


@method("slerp", params=SlerpParams, category="merging",
        properties=Properties(one_expert={}, order_invariant=False,
                              why="no scaling factor; more than two experts: a running spherical mean in task order"))
def slerp_merge(ctx: FusionContext, p: SlerpParams):
    experts = ctx.experts

    def merge(key, _):
        return interpolate_all([e[key].float() for e in experts], p.t,
                               lambda t, a, b: slerp(t, a, b, p.dot_threshold, p.epsilon))

    return map_entries(ctx.base, merge)
