"""Karcher mean: the Riemannian mean of the experts' weight directions, per tensor.

Karcher, "Riemannian center of mass and mollifier smoothing", Communications on Pure and
Applied Mathematics 30(5), 1977. doi:10.1002/cpa.3160300502 ; applied to model merging as
mergekit 0.1.5's `karcher` merge method.

Per tensor, each expert's weights theta_i are split into a norm and a unit direction; the
directions' weighted Karcher mean on the sphere is found by Riemannian gradient steps
(log maps summed, exponential map back) from their normalised Euclidean mean, for at most
max_iter steps or until the step's norm is below tol; the result is that direction times
the weighted mean of the norms. Experts weigh equally (mergekit's only form); the base
model is not used (mergekit's definition merges weights, not task vectors).
"""

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import map_entries


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, le=1000)
    tol: float = Field(1e-5, gt=0.0)


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's karcher_merge_tensors with equal weights."""
    if len(tensors) == 1:
        return tensors[0]
    alpha = 1 / len(tensors)
    norms = [float(torch.linalg.norm(t)) for t in tensors]
    units = [t / n if n != 0.0 else torch.zeros_like(t) for t, n in zip(tensors, norms)]
    valid = [u for u, n in zip(units, norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    share = 1 / len(valid)
    u = sum(share * v for v in valid)
    norm_u = float(torch.linalg.norm(u))
    u = valid[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for v in valid:
            dot = torch.clamp(torch.dot(u.flatten(), v.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                step += share * (theta / torch.sin(theta)) * (v - dot * u)
        step_norm = torch.linalg.norm(step)
        if step_norm.item() < tol:
            break
        u = torch.cos(step_norm) * u + torch.sin(step_norm) * (step / step_norm)
        u_norm = torch.linalg.norm(u)
        if u_norm.item() > tol:
            u = u / u_norm
    return sum(alpha * n for n in norms) * u


@method("karcher", params=KarcherParams, category="merging",
        properties=Properties(one_expert={}, why="no scaling factor: it merges weights, not task vectors"))
def karcher(ctx: FusionContext, p: KarcherParams):
    experts = ctx.experts
    return map_entries(ctx.base, lambda k, _: karcher_mean([e[k].float() for e in experts], p.max_iter, p.tol))
