"""State-dict arithmetic shared by merging methods.

Merging happens in float32 and is cast back, so a bf16/fp16 model stays in its dtype;
non-floating entries (position ids, counters) are taken from the base unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

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
    return map_keys(base, lambda k: fn(k, base[k]))


def map_keys(base: StateDict, fn: Callable[[str], Tensor]) -> StateDict:
    """Apply fn(name) -> float32 tensor to every floating entry of base, cast back to its dtype;
    copy the rest. For merges that read the base themselves, or not at all: a streaming base
    tells its dtypes without reading its tensors."""
    out = {}
    for k in base:
        dtype = base.dtype(k) if callable(getattr(base, "dtype", None)) else base[k].dtype
        out[k] = fn(k).to(dtype) if dtype.is_floating_point else base[k].clone()
    return out


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


# Elements per piece of a chunked merge: 1 MiB of float32, so one piece of the base, of the
# running total and of the expert being read stay in cache across all experts, and the merge
# costs little more than reading the experts' bytes.
CHUNK = 1 << 18


@contextlib.contextmanager
def single_thread():
    """Elementwise passes over state dicts are bound by memory, not arithmetic: a second
    OpenMP thread gains little on a quiet machine, and when the other core is busy every op
    waits for a descheduled thread (task arithmetic over 8 ViT-B/32 experts with one core
    busy: 11.1 s on 2 threads, 2.4 s on 1). Elementwise results do not depend on it."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def chunked(states: Sequence[StateDict], key: str) -> bool:
    """Whether every state can hand out float32 pieces of `key` (streaming checkpoints on CPU)."""
    return all(
        getattr(s, "reads_float32_slices", None) is not None and s.reads_float32_slices(key) for s in states)


def _pieces(n: int):
    return ((start, min(n, start + CHUNK)) for start in range(0, n, CHUNK))


def cores() -> int:
    return len(os.sched_getaffinity(0))


THREAD_PREFIX = "fbh-merge"


@functools.lru_cache(maxsize=1)
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(cores(), thread_name_prefix=THREAD_PREFIX)


# A forked child has none of its parent's threads: it makes its own pool when it needs one.
os.register_at_fork(after_in_child=_threads.cache_clear)


def parallel_map(fn: Callable, items: Sequence) -> list:
    """[fn(x) for x in items], on one thread per core. For independent work over tensors that
    runs torch single-threaded (inside single_thread()): file reads and torch's kernels release
    the GIL, and no thread waits on a descheduled one as OpenMP's barriers do. Results come in
    the order of items, whichever thread computed them. Called from one of these threads
    (TIES' per-entry work finding a k-th value), it runs in that thread: waiting there on the
    pool's other, equally busy threads would deadlock."""
    if len(items) <= 1 or cores() <= 1 or threading.current_thread().name.startswith(THREAD_PREFIX):
        return [fn(x) for x in items]
    return list(_threads().map(fn, items))


def over_pieces(n: int, work: Callable[..., object], buffers: int = 1) -> None:
    """work(a, b, *scratch) for every piece [a, b) of n elements, where scratch is `buffers`
    float32 buffers of b - a elements that the piece may use. Pieces are independent, so they
    are dealt out to one thread per core (parallel_map), each with its own scratch. Each
    piece's arithmetic is the same on any thread: the result does not depend on them."""
    pieces = list(_pieces(n))
    workers = min(len(pieces), cores())

    def deal(first: int) -> None:
        scratch = torch.empty(buffers, min(CHUNK, n))
        for a, b in pieces[first::workers]:
            work(a, b, *scratch[:, :b - a])
    parallel_map(deal, range(workers))


def mean(states: Sequence[StateDict], key: str) -> Tensor:
    """The float32 mean of one entry over several state dicts, accumulated in place one
    state at a time (the same summation order as FusionBench's state_dict_add): from
    streaming checkpoints piece by piece, with no [N, ...] stack and no per-expert buffer."""
    first = states[0]
    if chunked(states, key):
        shape = first.shape(key)
        total = torch.empty(shape).reshape(-1)

        def piece(a: int, b: int, scratch: Tensor) -> None:
            part = first.read_slice(key, a, total[a:b])
            for s in states[1:]:
                part.add_(s.read_slice(key, a, scratch))
            part.div_(len(states))
        with single_thread():
            over_pieces(total.numel(), piece)
        return total.reshape(shape)
    total = writable_float(first, key)
    for s in states[1:]:
        total.add_(s[key].to(total.device))
    return total.div_(len(states))


def delta_sum(states: Sequence[StateDict], key: str, base: StateDict,
              then: Callable[[Tensor, Tensor], object] | None = None) -> Tensor:
    """sum_i (states[i][key] - base[key]) in float32, in FusionBench's order (the first task
    vector, then each next one added), with the same bits as out of place. `then(total, ref)`
    is applied in place to each piece while it is in cache, ref being the base's piece (task
    arithmetic scales and adds the base there). From streaming checkpoints on the CPU it goes
    piece by piece (see CHUNK), the base's pieces read like the experts'; otherwise each
    expert's tensor becomes its task vector in place and is added in place."""
    then = then or (lambda total, ref: None)
    if states and chunked([base, *states], key):
        shape = base.shape(key)
        total = torch.empty(shape).reshape(-1)

        def piece(a: int, b: int, ref: Tensor, scratch: Tensor) -> None:
            base.read_slice(key, a, ref)
            part = states[0].read_slice(key, a, total[a:b]).sub_(ref)
            for s in states[1:]:
                part.add_(s.read_slice(key, a, scratch).sub_(ref))
            then(part, ref)
        with single_thread():
            over_pieces(total.numel(), piece, buffers=2)
        return total.reshape(shape)
    ref = base[key].float()
    total = None
    for s in states:
        delta = writable_float(s, key)
        delta.sub_(ref.to(delta.device))
        total = delta if total is None else total.add_(delta)
    if total is None:
        total = torch.zeros_like(ref)
    then(total, ref.to(total.device))
    return total
