"""NuSLERP: spherical interpolation of two experts' task vectors (or weights), row-wise or whole.

Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models", EMNLP 2024
Industry Track. arXiv:2403.13257 ; the `nuslerp` merge method of mergekit 0.1.5.

Two experts: per tensor, slerp(t, v_1, v_2) with t the second expert's weight, where v_i is
the task vector theta_i - theta_pre (relative_to_base, mergekit's form with a base model,
the result added to theta_pre) or the weights themselves; flatten treats the tensor as one
vector, else each row (row_wise) or each column is interpolated separately; (nearly)
colinear vectors are interpolated linearly. More than two experts, which mergekit refuses:
fbh takes a running spherical mean m_1 = v_1, m_i = slerp(1/i, m_{i-1}, v_i), as
methods/slerp.py does, so the result follows the suite's task order and t is unused.
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries
from methods._common import interpolate_all, origin


class NuSlerpParams(Params):
    t: float = Field(0.5, ge=0.0, le=1.0, description="weight of the second expert (two experts only)")
    relative_to_base: bool = Field(True, description="interpolate task vectors, not weights")
    flatten: bool = Field(True, description="one vector per tensor (mergekit's default)")
    row_wise: bool = Field(False, description="without flatten: interpolate rows, not columns")


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
            eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp: slerp along `dim` (or of the flattened tensors), lerp where colinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit = lambda x: x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


@method("nuslerp", params=NuSlerpParams, category="merging",
        properties=Properties(one_expert={}, order_invariant=False,
                              why="no scaling factor; beyond two experts (which mergekit refuses) a running "
                                  "mean in task order"))
def nuslerp_merge(ctx: FusionContext, p: NuSlerpParams):
    def merge(key, base):
        centre = origin(base, p.relative_to_base)
        return centre + interpolate_all([e[key].float() - centre for e in ctx.experts], p.t, lambda t, a, b: nuslerp(
            t, a, b, dim=0 if p.row_wise else -1, flatten=p.flatten))

    return map_entries(ctx.base, merge)
