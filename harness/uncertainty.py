"""How sure a ranking is: intervals of averages, rank ranges and paired comparisons.

Every result row stores its statistic on each of the same bootstrap resamples of its test examples
(harness.evaluate: the resamples depend only on the task and the number of examples). So, for entries
computed on one fingerprint:

* an average over tasks has replicates too: the mean over tasks of the tasks' replicates (tasks are
  resampled independently, as the per-task intervals are);
* two entries' replicates on a task are paired (the same resampled examples), so the replicates of their
  difference give a paired-bootstrap interval and p-value, and the replicates of every entry's average
  give each entry's range of ranks.

Rows stored before replicates were (schema 2) have none: their averages carry no interval and their rank
is their place alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.store import Store

LEVEL = 0.95


def task_replicates(store: Store, run_ids: list[str], condition: str, severity: int | None,
                    primary: dict[str, str], task_split: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """run_id -> task -> its primary metric's bootstrap replicates under one condition (rows without any
    are left out)."""
    if not run_ids:
        return {}
    rows = store.query(
        "SELECT run_id, task, task_split, metric, replicates FROM results WHERE condition = ? "
        "AND (?::INTEGER IS NULL OR severity = ?) AND replicates IS NOT NULL "
        "AND run_id IN (SELECT unnest(?::VARCHAR[]))", [condition, severity, severity, run_ids])
    out: dict[str, dict[str, np.ndarray]] = {}
    for r in rows:
        if (task_split is None or r["task_split"] == task_split) and r["metric"] == primary.get(r["task"], r["metric"]):
            out.setdefault(r["run_id"], {})[r["task"]] = np.asarray(r["replicates"], dtype=np.float64)
    return out


def seed_mean(per_seed: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Task -> the mean of the seeds' replicates, for tasks every seed has (one seed: itself)."""
    if len(per_seed) == 1:
        return per_seed[0]
    tasks = [t for t in per_seed[0] if all(t in s and len(s[t]) == len(per_seed[0][t]) for s in per_seed)]
    return {t: np.mean(np.stack([s[t] for s in per_seed]), axis=0) for t in tasks}


def average_replicates(by_task: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray | None:
    """Replicates of the mean over `tasks`; None unless every task has replicates of one length."""
    if not tasks or any(t not in by_task for t in tasks) or len({len(by_task[t]) for t in tasks}) != 1:
        return None
    return np.mean(np.stack([by_task[t] for t in tasks]), axis=0)


def interval(replicates: np.ndarray | None) -> tuple[float, float] | None:
    """The central 95% percentile interval; resamples on which the statistic is undefined are left out."""
    if replicates is None:
        return None
    finite = replicates[np.isfinite(replicates)]
    if not len(finite):
        return None
    lo, hi = np.quantile(finite, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def rank_ranges(averages: list[float], replicates: list[np.ndarray | None], higher_better: bool = True
                ) -> list[tuple[int, int]]:
    """Each entry's 95% range of ranks (1 = best) over the bootstrap resamples, its average's replicates
    ranked against everyone's on the same resample. An entry without replicates keeps its average on
    every resample. With no replicates at all, each entry's range is its place."""
    n = len(averages)
    if n == 0:
        return []
    lengths = {len(r) for r in replicates if r is not None}
    sign = 1.0 if higher_better else -1.0
    if len(lengths) != 1:
        order = sorted(range(n), key=lambda i: -sign * averages[i])
        place = {i: k + 1 for k, i in enumerate(order)}
        return [(place[i], place[i]) for i in range(n)]
    samples = lengths.pop()
    matrix = np.stack([r if r is not None else np.full(samples, a) for a, r in zip(averages, replicates)])
    matrix = matrix[:, np.isfinite(matrix).all(axis=0)]
    if matrix.shape[1] == 0:
        return rank_ranges(averages, [None] * n, higher_better)
    # rank on a resample = 1 + how many entries are strictly better there (ties share the better rank)
    better = (sign * matrix)[None, :, :] > (sign * matrix)[:, None, :]
    ranks = 1 + better.sum(axis=1)
    lo = np.quantile(ranks, (1 - LEVEL) / 2, axis=1, method="lower")
    hi = np.quantile(ranks, (1 + LEVEL) / 2, axis=1, method="higher")
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


def rank_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


@dataclass
class Difference:
    """A minus B on one task (or the average), with its paired-bootstrap interval and two-sided p-value."""
    what: str
    a: float | None
    b: float | None
    difference: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    resamples: int = 0


def paired_difference(what: str, a: float | None, b: float | None, a_reps: np.ndarray | None,
                      b_reps: np.ndarray | None) -> Difference:
    """The observed difference a - b, and from the paired replicates (the same resampled examples) its
    interval and the two-sided p-value of 'no difference': twice the share of resampled differences on
    the far side of zero, at least 1/resamples (a bootstrap cannot say less)."""
    diff = None if a is None or b is None else a - b
    if a_reps is None or b_reps is None or len(a_reps) != len(b_reps):
        return Difference(what, a, b, diff, None, None)
    d = a_reps - b_reps
    d = d[np.isfinite(d)]
    if not len(d):
        return Difference(what, a, b, diff, None, None)
    ((lo, hi, p),) = _summaries(d[None, :])
    return Difference(what, a, b, diff, (lo, hi), p, len(d))


def paired_differences(what: str, a: np.ndarray, b: np.ndarray, a_reps: np.ndarray, b_reps: np.ndarray
                       ) -> list[Difference]:
    """paired_difference of many pairs at once, row k of each array being one pair's (values, replicates
    of one length): the same numbers from one quantile call instead of one per pair. A row with a
    non-finite replicate takes the one-pair path, which leaves those resamples out."""
    d = a_reps - b_reps
    finite = np.isfinite(d).all(axis=1)
    out: list[Difference | None] = [None] * len(a)
    rows = np.flatnonzero(finite)
    for k, (lo, hi, p) in zip(rows, _summaries(d[rows])):
        out[k] = Difference(what, float(a[k]), float(b[k]), float(a[k] - b[k]), (lo, hi), p, d.shape[1])
    for k in np.flatnonzero(~finite):
        out[k] = paired_difference(what, float(a[k]), float(b[k]), a_reps[k], b_reps[k])
    return out


def _summaries(d: np.ndarray) -> list[tuple[float, float, float]]:
    """(interval low, high, p-value) of each row of finite resampled differences: the central 95% and
    twice the share on the far side of zero, at least 1/resamples."""
    if not len(d):
        return []
    lo, hi = np.quantile(d, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=1)
    share = np.minimum(np.mean(d <= 0, axis=1), np.mean(d >= 0, axis=1))
    p = np.minimum(1.0, np.maximum(2 * share, 1 / d.shape[1]))
    return [(float(x), float(y), float(z)) for x, y, z in zip(lo, hi, p)]
