"""State-dict arithmetic shared by merging methods.

Merging happens in float32 and is cast back, so a bf16/fp16 model stays in its dtype;
non-floating entries (position ids, counters) are taken from the base unchanged.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def mergeable(name: str, tensor: Tensor) -> bool:
    return tensor.is_floating_point()


def task_vector(base: StateDict, expert: StateDict) -> StateDict:
    """tau = theta_expert - theta_base for every floating entry (float32)."""
    return {k: expert[k].float() - v.float() for k, v in base.items() if mergeable(k, v)}


def apply_delta(base: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    """theta_base + scale * delta, keeping the base's dtype and device per entry."""
    out = {}
    for k, v in base.items():
        if k in delta:
            out[k] = (v.float() + scale * delta[k].to(v.device)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def map_entries(base: StateDict, fn: Callable[[str, Tensor], Tensor]) -> StateDict:
    """Apply fn(name, base_tensor) -> float32 tensor to every mergeable entry; copy the rest."""
    return {k: (fn(k, v).to(v.dtype) if mergeable(k, v) else v.clone()) for k, v in base.items()}


def stack(states: Sequence[StateDict], key: str) -> Tensor:
    """Stack one entry of several state dicts along a new leading axis, in float32."""
    return torch.stack([s[key].float() for s in states])


def writable_float(state: StateDict, key: str) -> Tensor:
    """state[key] in float32, safe to modify in place: a streaming state dict (fresh_tensors)
    hands out a new buffer on every access, so it is used as it is; an eager dict's tensor is
    copied (or cast, which copies)."""
    t = state[key]
    f = t.float()
    return f if f is not t or getattr(state, "fresh_tensors", False) else f.clone()


def mean(states: Sequence[StateDict], key: str) -> Tensor:
    """The float32 mean of one entry over several state dicts, accumulated in place one
    state at a time: with streaming states only one input tensor is held at once, and no
    [N, ...] stack is built (the same summation order as FusionBench's state_dict_add)."""
    total = writable_float(states[0], key)
    for s in states[1:]:
        total.add_(s[key].to(total.device))
    return total.div_(len(states))


def delta_sum(states: Sequence[StateDict], key: str, base_tensor: Tensor) -> Tensor:
    """sum_i (states[i][key] - base) in float32, in FusionBench's order (the first task vector,
    then each next one added). Each expert's tensor becomes its task vector in place and is
    added in place, so a streaming merge allocates nothing beyond the buffers it reads into:
    twice as fast as building every difference and partial sum anew, with the same bits."""
    b = base_tensor.float()
    total = None
    for s in states:
        delta = writable_float(s, key)
        delta.sub_(b.to(delta.device))
        total = delta if total is None else total.add_(delta)
    return total if total is not None else torch.zeros_like(b)


def check_compatible(base: StateDict, experts: Iterable[StateDict]) -> None:
    for i, e in enumerate(experts):
        if e.keys() != base.keys():
            missing = sorted(set(base) - set(e))[:3]
            extra = sorted(set(e) - set(base))[:3]
            raise ValueError(f"expert {i} does not match the base architecture (missing {missing}, extra {extra})")
        for k, v in base.items():
            if e[k].shape != v.shape:
                raise ValueError(f"expert {i} entry '{k}' has shape {tuple(e[k].shape)}, base {tuple(v.shape)}")


def num_parameters(state: StateDict) -> int:
    return sum(v.numel() for k, v in state.items() if mergeable(k, v))
