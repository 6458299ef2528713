"""TIES-merging: trim, elect sign, disjoint merge of task vectors.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
arXiv:2306.01708

Choices, named so results are comparable:
- top_k_scope='global' keeps the top-k fraction of each expert's whole flattened task
  vector (the paper and FusionBench); 'per_tensor' trims each tensor separately.
- disjoint_merge='mean' averages the agreeing entries (the paper); 'sum' adds them
  (FusionBench's default merge_func).
"""

import itertools
from typing import Literal

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import CHUNK, apply_delta, chunked, mergeable, parallel_map, single_thread


class TiesParams(Params):
    # The paper's lambda for its mean merge is 1 (FusionBench's 0.3 goes with its sum merge).
    scaling_factor: float = Field(1.0, ge=0.0, le=10.0)
    top_k: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    top_k_scope: Literal["global", "per_tensor"] = "global"
    disjoint_merge: Literal["mean", "sum"] = "mean"


COLUMNS = 1 << 15  # entries per piece of the merge pass: [8, COLUMNS] float32 is 1 MiB


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """x.kthvalue(k) of a large 1-D tensor, exactly, in a fraction of its time (3 s for 88M
    entries): a seeded sample brackets the value, one pass counts what lies below the
    bracket, and kthvalue runs on the few entries inside it. Falls back to the plain
    kthvalue if the bracket misses (vanishingly rare with a million-entry sample)."""
    n = x.numel()
    if n <= 1 << 22:
        return x.kthvalue(k).values
    m = 1 << 20
    sample = x[torch.randint(n, (m,), generator=torch.Generator().manual_seed(0)).to(x.device)]
    q, margin = k / n, 0.003  # a quantile estimated from 2^20 draws is off by < 0.0005 (1 sd)
    lo = sample.kthvalue(max(1, int((q - margin) * m))).values
    hi = sample.kthvalue(min(m, int((q + margin) * m) + 1)).values
    # On the CPU cache-sized pieces, each compared three times, shared among the cores; a GPU
    # takes the whole vector (where kthvalue on one huge slice is slow: TIES over 8 ViT-B/32
    # experts took 5.8 s with it).
    def count(piece: torch.Tensor) -> tuple[int, torch.Tensor]:
        inside = piece >= lo
        at_least = int(inside.view(torch.uint8).sum(dtype=torch.int64))  # summing bytes beats summing bools
        inside.logical_and_(piece <= hi)
        return piece.numel() - at_least, torch.masked_select(piece, inside)  # twice as fast as piece[inside]
    counted = parallel_map(count, x.split(CHUNK)) if x.device.type == "cpu" else [count(x)]
    below = sum(count for count, _ in counted)
    inside = torch.cat([kept for _, kept in counted])
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return x.kthvalue(k).values


def trim_thresholds(magnitudes: torch.Tensor, top_k: float) -> torch.Tensor | None:
    """Per row of [N, D] magnitudes, the value at or above which the top_k fraction is kept
    (ties kept, as FusionBench does); None when nothing is dropped."""
    d = magnitudes.shape[1]
    drop = d - int(d * top_k)
    if drop <= 0:
        return None
    return torch.stack([kth_smallest(row, drop) for row in magnitudes]).unsqueeze(1)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, how: str) -> torch.Tensor:
    """Sum (or mean) over experts of the entries that agree with the elected sign; where the
    sign is not positive, the negative entries agree."""
    return finish(*agreeing_sum(trimmed, sign), how)


def finish(total: torch.Tensor, agreeing: torch.Tensor, how: str) -> torch.Tensor:
    """The disjoint sum, or that sum over the count of agreeing entries (the mean)."""
    return total if how == "sum" else total / agreeing.sign().sum(dim=0).clamp_(min=1)


def agreeing_sum(trimmed: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum over experts of the entries that agree with the elected sign, and the agreeing
    magnitudes. Computed as the sum of the agreeing magnitudes times the sign: the same bits
    as summing the agreeing entries (IEEE addition is symmetric in sign), in float passes
    only (a comparison's bool mask costs as much as four of them on the CPU)."""
    elected = sign.sub(0.5).sign_()  # +1 where the sign is positive, else -1
    agreeing = (trimmed * elected).clamp_(min=0)
    return agreeing.sum(dim=0).mul_(elected), agreeing


def elect_and_merge(trimmed: torch.Tensor, how: str) -> torch.Tensor:
    """Elect each entry's sign by its summed mass (an entry whose votes cancel takes the
    majority sign of the whole tensor) and merge the agreeing entries."""
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    return disjoint_merge(trimmed, sign, how)


def global_thresholds(ref: dict[str, torch.Tensor], experts, keys: list[str], top_k: float) -> torch.Tensor | None:
    """Each expert's trim threshold over its whole flattened task vector, one expert held at a time."""
    sizes = [ref[k].numel() for k in keys]
    total = sum(sizes)
    if total - int(total * top_k) <= 0:
        return None
    rows = []
    magnitudes = torch.empty(total, device=ref[keys[0]].device)
    offsets = [0, *itertools.accumulate(sizes)]
    for e in experts:
        def fill(i: int, e=e) -> None:
            k, a = keys[i], offsets[i]
            into = magnitudes[a:a + sizes[i]]
            if streaming(ref[k], [e], k):  # straight into place: no fresh buffer to fault in and copy
                e.read_slice(k, 0, into).sub_(ref[k].reshape(-1)).abs_()
            else:
                torch.sub(e[k].float().reshape(-1), ref[k].reshape(-1), out=into).abs_()
        on_threads(ref)(fill, range(len(keys)))
        rows.append(trim_thresholds(magnitudes.unsqueeze(0), top_k))
    return torch.cat(rows)


def ties_delta(base, experts, p: TiesParams) -> dict[str, torch.Tensor]:
    """The merged task vector, one entry at a time: with global scope each expert's threshold
    comes first (one pass holding one expert), then every entry is trimmed, elected and
    merged from the experts' tensors for that entry alone. Memory stays at a few models'
    size instead of N flattened task vectors; the result has the same bits as trimming the
    stacked [N, D] vectors at once."""
    keys = [k for k, v in base.items() if mergeable(k, v)]
    with single_thread():
        ref = {k: base[k].float() for k in keys}
        thresholds = global_thresholds(ref, experts, keys, p.top_k) if p.top_k_scope == "global" else None
        merged = on_threads(ref)(lambda k: merge_entry(k, ref[k], experts, thresholds, p), keys)
        out, ties, votes = {}, [], 0
        for k, (entry, entry_ties, entry_votes) in zip(keys, merged):
            out[k] = entry
            ties += entry_ties
            votes += entry_votes
        if votes > 0:  # entries whose votes cancel take the majority sign of the whole vector
            for k, tied, if_positive in ties:
                out[k].view(-1)[tied] = if_positive
    return out


def on_threads(ref: dict[str, torch.Tensor]):
    """parallel_map on the CPU, where entries and pieces are shared among the cores; a GPU's
    kernels are issued from this thread."""
    return parallel_map if next(iter(ref.values())).device.type == "cpu" else lambda fn, xs: list(map(fn, xs))


def merge_entry(k: str, ref: torch.Tensor, experts, thresholds: torch.Tensor | None, p: TiesParams):
    """One entry's merged task vector, the entries whose votes cancel (with what they become
    if the whole vector votes positive), and the entry's sum of elected signs."""
    flat, n = ref.reshape(-1), ref.numel()
    if p.top_k_scope == "per_tensor":
        rows = whole_rows(k, flat, experts)
        merged = elect_and_merge(trim(rows, trim_thresholds(rows.abs(), p.top_k)), p.disjoint_merge)
        return merged.view(ref.shape), [], 0
    merged = torch.empty(n, device=ref.device)
    ties, votes = [], 0
    # On a GPU a whole entry is one piece: launches, not cache, are what costs there.
    columns = COLUMNS if ref.device.type == "cpu" else n
    stream = streaming(ref, experts, k)
    if stream:  # each piece read into one reused [N, columns] buffer
        scratch = torch.empty(len(experts) * min(columns, n))
    else:
        rows = whole_rows(k, flat, experts)
    for a in range(0, n, columns):  # pieces whose ten elementwise passes stay in cache
        b = min(n, a + columns)
        if stream:
            piece = scratch[:len(experts) * (b - a)].view(len(experts), b - a)
            for row, e in zip(piece, experts):
                e.read_slice(k, a, row)
            piece = trim(piece.sub_(flat[a:b]), thresholds)
        else:
            piece = trim(rows[:, a:b].contiguous(), thresholds)
        sign = torch.sign(piece.sum(dim=0))
        votes += int(sign.sum())
        total, agreeing = agreeing_sum(piece, sign)
        merged[a:b] = finish(total, agreeing, p.disjoint_merge)
        # A nonzero sign has a nonzero total, so a column whose votes cancel (sign 0, some entry
        # nonzero, merged as negative) shows as one more nonzero total: a rare case, found
        # exactly (float sums of 0/1 count faster than count_nonzero; a NaN column counts in neither).
        if torch.nansum(total.sign().abs_()) > torch.nansum(sign.abs()):
            tied = ((sign == 0) & (total != 0)).nonzero().squeeze(1)
            if_positive = torch.ones(tied.numel(), device=piece.device)
            ties.append((k, tied + a, disjoint_merge(piece[:, tied], if_positive, p.disjoint_merge)))
    return merged.view(ref.shape), ties, votes


def streaming(ref: torch.Tensor, experts, k: str) -> bool:
    """Whether the experts' pieces of entry k can be read straight into a buffer (streaming
    float32 checkpoints on the CPU) instead of reading each expert's whole entry."""
    return ref.device.type == "cpu" and chunked(experts, k)


def whole_rows(k: str, flat: torch.Tensor, experts) -> torch.Tensor:
    """The experts' task vectors of entry k as [N, numel] rows."""
    return torch.stack([e[k].float().reshape(-1) - flat for e in experts])


def trim(rows: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Zero, in place, the entries of each row below its threshold (ties kept). hardshrink at
    the float just below the threshold keeps exactly |x| >= threshold, in one pass per row
    (an abs, a bool mask and a product took four times as long)."""
    if thresholds is None:
        return rows
    below = torch.nextafter(thresholds.reshape(-1), torch.tensor(-torch.inf, device=rows.device)).tolist()
    for row, shrink in zip(rows, below):
        torch.hardshrink(row, shrink, out=row)
    return rows


@method("ties_merging", params=TiesParams, category="merging",
        properties=Properties(scaling_zero={"scaling_factor": 0.0}, one_expert={"scaling_factor": 1.0, "top_k": 1.0},
                              quick={"top_k": 0.5}))
def ties_merging(ctx: FusionContext, params: TiesParams):
    return apply_delta(ctx.base, ties_delta(ctx.base, ctx.experts, params), params.scaling_factor)
