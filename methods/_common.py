"""Pieces shared by several merging methods (files starting with '_' are not methods).

Every function works on task vectors (float32 state dicts from harness.tensors.task_vector)
and returns a merged task vector; methods add it to the base with harness.tensors.apply_delta.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from pydantic import Field

from harness.registry import Params
from harness.tensors import StateDict, map_entries


def random_drop(tv: StateDict, rate: float, rescale: bool, generator: torch.Generator) -> StateDict:
    """DARE: zero each entry with probability `rate`, rescale the survivors by 1/(1-rate).

    Masks are drawn entry by entry in the state dict's order from one generator, so the
    same seed gives the same masks (and the same draws as FusionBench's global-RNG code).
    """
    out = {}
    for k, v in tv.items():
        # drawn on the CPU whatever the device, so a seed gives the same masks on every machine
        keep = (torch.rand(v.shape, generator=generator, dtype=v.dtype) > rate).to(v.device)
        dropped = v * keep
        out[k] = dropped / (1 - rate) if rescale and rate < 1 else dropped
    return out


def is_matrix(key: str, tensor: Tensor, exclude: Sequence[str] = ()) -> bool:
    """Entries that SVD-based merges treat as matrices (FusionBench: every 2-D entry)."""
    return tensor.dim() == 2 and key not in exclude


def merge_matrices(task_vectors: Sequence[StateDict], matrix_fn: Callable[[list[Tensor]], Tensor],
                   exclude: Sequence[str] = ()) -> StateDict:
    """matrix_fn(list of per-task matrices) for 2-D entries; the mean task vector elsewhere."""
    out = {}
    for k, first in task_vectors[0].items():
        per_task = [tv[k] for tv in task_vectors]
        out[k] = matrix_fn(per_task) if is_matrix(k, first, exclude) else torch.stack(per_task).mean(0)
    return out


def orthogonalize(m: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (rows, if wide): U V^T of its SVD (polar factor)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def sum_task_vectors(task_vectors: Sequence[StateDict]) -> StateDict:
    return {k: torch.stack([tv[k] for tv in task_vectors]).sum(0) for k in task_vectors[0]}


def majority_sign_mask(deltas: Tensor) -> Tensor:
    """mergekit's TIES sign consensus over stacked [N, ...] deltas: the elected sign is + where
    the deltas sum to >= 0, else -; an entry is kept where its sign equals it (zeros never are).
    Unlike methods/ties_merging.py, a sum of exactly zero elects +, as mergekit does."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == elected


def origin(base: Tensor, relative_to_base: bool) -> Tensor:
    """Where an interpolation of weights is centred: the base's tensor (interpolating task vectors) or zero."""
    return base.float() if relative_to_base else torch.zeros_like(base, dtype=torch.float32)


def interpolate_all(tensors: Sequence[Tensor], t: float,
                    interpolate: Callable[[float, Tensor, Tensor], Tensor]) -> Tensor:
    """Two tensors: interpolate(t, a, b). More: the running mean m_1 = x_1, m_i = interpolate(1/i, m_{i-1}, x_i),
    which for a spherical interpolation depends on the tensors' order (a Euclidean one would not)."""
    if len(tensors) == 2:
        return interpolate(t, tensors[0], tensors[1])
    running = tensors[0]
    for i, x in enumerate(tensors[1:], start=2):
        running = interpolate(1 / i, running, x)
    return running


class SparsifiedSumParams(Params):
    """Shared hyperparameters of mergekit's generalized task arithmetic (each method adds its sparsifier's)."""
    scaling_factor: float = Field(0.3, ge=0.0, le=10.0, description="lambda")
    rescale: bool = Field(False, description="rescale survivors to the tensor's L1 norm")
    normalize: bool = Field(False, description="average the sparsified task vectors instead of summing")


def sparsified_sum(ctx, sparsify: Callable[[Tensor], Tensor], sign_consensus: bool,
                   p: SparsifiedSumParams) -> StateDict:
    """mergekit's generalized task arithmetic, every expert of weight 1: per entry, each task vector
    sparsified, mixed by mix_deltas, scaled by lambda and added to the base."""
    experts = ctx.experts

    def merge(key: str, base: Tensor) -> Tensor:
        ref = base.float()
        deltas = torch.stack([sparsify(e[key].float() - ref) for e in experts])
        return ref + p.scaling_factor * mix_deltas(deltas, sign_consensus, p.normalize)

    return map_entries(ctx.base, merge)


def l1_rescaled(t: Tensor, keep: Tensor, eps: float = 1e-7) -> Tensor:
    """t * keep, scaled back to t's L1 norm (mergekit's rescale of a sparsified task vector);
    unscaled when either norm is below eps."""
    masked = t * keep
    before, after = t.abs().sum(), masked.abs().sum()
    return masked if before < eps or after < eps else masked * (before / after)


def mix_deltas(deltas: Tensor, sign_consensus: bool, normalize: bool) -> Tensor:
    """mergekit's generalized task arithmetic over stacked [N, ...] sparsified deltas, every
    expert of weight 1: their sum (with sign_consensus, of the entries agreeing with the
    elected sign), divided by the number of contributors when normalize."""
    if sign_consensus:
        keep = majority_sign_mask(deltas).to(deltas.dtype)
        mixed, count = (deltas * keep).sum(dim=0), keep.sum(dim=0)
        count[count == 0] = 1
    else:
        mixed, count = deltas.sum(dim=0), float(len(deltas))
    return mixed / count if normalize else mixed
