"""Evaluate a fused result on a suite's tasks and conditions; produce result rows."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from harness.api import Ensemble
from harness.families import Family
from harness.metrics import metric as metric_info
from harness.predictor import Predictor, combine
from harness.progress import Progress, Steps
from harness.digests import load_verified, save_verified, tensors_digest
from harness.tensors import StateDict

BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class ResultRow:
    task: str
    task_split: str          # 'seen' or 'unseen' (every task is 'seen' when all experts are fused)
    condition: str           # 'clean' or a corruption name
    severity: int | None
    metric: str
    value: float             # in percent for accuracy-like metrics
    n: int
    ci_low: float | None
    ci_high: float | None
    # The statistic on each bootstrap resample of the test examples (bootstrap_replicates): the
    # resamples depend only on the task and n, so two entries' replicates on one task are paired
    # (the same resampled examples) and an average's interval is the mean of the tasks' replicates.
    replicates: list[float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def as_predictor(fused, family: Family) -> Predictor:
    if isinstance(fused, Ensemble):
        members = [m if isinstance(m, nn.Module) else family.build(m) for m in fused.members]
        if not members:
            raise ValueError("an ensemble needs at least one member")
        weights = list(fused.weights) if fused.weights is not None else None
        if weights is not None and len(weights) != len(members):
            raise ValueError(f"ensemble has {len(members)} members but {len(weights)} weights")
        return Predictor([m.eval() for m in members], weights, fused.reduce, [checkpoint_key(m) for m in fused.members])
    if isinstance(fused, nn.Module):
        return Predictor([fused.eval()])
    if isinstance(fused, Mapping):  # a dict, or a streaming harness.pool.LazyStateDict
        check_state(fused)
        return Predictor([family.build(fused)], member_keys=[checkpoint_key(fused)])
    raise TypeError(f"a method must return a state dict, an nn.Module or an Ensemble, not {type(fused).__name__}")


def checkpoint_key(member) -> str | None:
    """A stored checkpoint's identity (a streaming state dict read from files); None otherwise."""
    identity = getattr(member, "identity", None)
    return identity() if identity is not None and not isinstance(member, nn.Module) else None


def check_state(state: StateDict) -> None:
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"entry '{k}' of the fused state dict is {type(v).__name__}, not a tensor")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"fused weights contain NaN or inf in '{k}'")


@torch.no_grad()
def predict(predictor: Predictor, family: Family, task: str, inputs: Tensor, batch_size: int,
            cached: Callable[[str], Path] | None = None) -> Tensor:
    """Logits of the predictor on inputs. cached(member_key) names the file holding that
    stored checkpoint's logits on these inputs: read when it exists, written once computed."""
    # Families whose outputs are not one forward pass of logits (e.g. generated text) predict themselves.
    own = getattr(family, "predict", None)
    if own is not None:
        return own(predictor, task, inputs, batch_size)
    keys = predictor.member_keys or [None] * len(predictor.members)
    files = [cached(k) if cached is not None and k is not None else None for k in keys]
    stored = [load_verified(f, what="cached outputs")[0]["logits"] if f is not None and f.is_file() else None
              for f in files]
    computed: list[list[Tensor]] = [[] for _ in predictor.members]
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        logits = []
        for i, m in enumerate(predictor.members):
            if stored[i] is not None:
                logits.append(stored[i][start:start + batch_size])
            else:
                logits.append(family.logits(m, task, x).float())
                if files[i] is not None:
                    computed[i].append(logits[-1].cpu())
        outs.append(combine(predictor, torch.stack(logits)).cpu())
    for f, parts in zip(files, computed):
        if f is not None and parts:
            save_verified(f, {"logits": torch.cat(parts)})
    return torch.cat(outs)


def task_seed(task: str) -> int:
    """The bootstrap seed of a task's test examples: tasks are resampled independently, every entry
    of a task alike (so differences between entries are paired)."""
    return int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "big")


def bootstrap_replicates(per_example: Tensor, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> Tensor | None:
    """The mean of per_example on each of `samples` bootstrap resamples (float64); None under 2 examples."""
    n = len(per_example)
    if n < 2:
        return None
    return per_example.double()[resample_indices(n, samples, seed)].mean(dim=1)


def percentile_interval(replicates: Tensor) -> tuple[float, float]:
    """95% percentile interval of bootstrap replicates, non-finite ones left out (NaN when none is finite)."""
    finite = replicates[torch.isfinite(replicates)]
    if not len(finite):
        return float("nan"), float("nan")
    lo, hi = torch.quantile(finite.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


@functools.lru_cache(maxsize=8)
def resample_indices(n: int, samples: int, seed: int) -> Tensor:
    """The bootstrap's [samples, n] example indices for one task's n examples (seed: task_seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (samples, n), generator=g)


def split_name(family: Family, task: str, role: str) -> str:
    """The dataset split a task declares for a role ('test', 'validation'): GLUE tests on 'validation'."""
    spec = family.suite.task(task)
    return {"test": spec.split, "validation": spec.validation_split}.get(role) or role


def score_task(predictor: Predictor, family: Family, task: str, *, split: str, task_split: str,
               condition: str = "clean", severity: int | None = None, batch_size: int = 256,
               outputs_cache: Path | None = None, limit: int | None = None) -> list[ResultRow]:
    """One row per metric of the task: its primary metric first, then its extra_metrics."""
    inputs, targets = family.eval_data(task, split_name(family, task, split),
                                       None if condition == "clean" else condition, severity)
    if limit is not None:
        inputs, targets = inputs[:limit], targets[:limit]
    where_stored = None
    if outputs_cache is not None and any(k is not None for k in predictor.member_keys or []):
        data = tensors_digest({"inputs": inputs, "targets": targets})[7:27]  # what the outputs were computed on
        where_stored = lambda member: outputs_cache / f"{member}-{task}-{condition}-{data}.safetensors"  # noqa: E731
    outputs = predict(predictor, family, task, inputs, batch_size, where_stored)
    spec = family.suite.task(task)
    where = dict(task=task, task_split=task_split, condition=condition, severity=severity)
    # A corpus-level metric (Spearman, mIoU) comes from the family as a function of an example
    # sample, in reported units; otherwise the metric is the mean of per-example scores, in percent.
    statistic = getattr(family, "statistic", None)
    value_of = statistic(task, outputs, targets) if statistic is not None else None
    if (value_of is not None) != (metric_info(spec.metric).aggregation == "corpus"):
        raise TypeError(f"the {type(family).__name__} family computes '{spec.metric}' of task '{task}' as a "
                        f"{'corpus statistic' if value_of is not None else 'mean of per-example scores'}, but "
                        f"harness.metrics registers it as aggregation '{metric_info(spec.metric).aggregation}'")
    seed = task_seed(task)
    if value_of is not None:
        rows = [statistic_row(value_of, len(targets), seed, metric=spec.metric, **where)]
    else:
        per_example = family.score(task, outputs, targets)
        rows = [replicates_row(100 * float(per_example.mean()), len(per_example),
                               bootstrap_replicates(100 * per_example.double(), seed), metric=spec.metric, **where)]
    # Extra metrics (pixel accuracy beside mIoU, ...) come from families that compute several per task.
    for metric in spec.extra_metrics:
        rows.append(statistic_row(family.metric_statistic(task, metric, outputs, targets), len(targets), seed,
                                  metric=metric, **where))
    return rows


def replicates_row(value: float, n: int, replicates: Tensor | None, **fields) -> ResultRow:
    """A row with its 95% interval and replicates; a single example's interval is its value."""
    if replicates is None:
        return ResultRow(value=value, n=n, ci_low=value, ci_high=value, **fields)
    lo, hi = percentile_interval(replicates)
    return ResultRow(value=value, n=n, ci_low=lo, ci_high=hi, replicates=replicates.float().tolist(), **fields)


def statistic_row(value_of, n: int, seed: int, **fields) -> ResultRow:
    return replicates_row(value_of(torch.arange(n)), n, bootstrap_statistic(value_of, n, seed), **fields)


def bootstrap_statistic(value_of, n: int, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> Tensor | None:
    """Any statistic of an example sample (a corpus-level metric) on each bootstrap resample;
    a resample on which it is undefined gives NaN."""
    if n < 2:
        return None
    return torch.tensor([value_of(idx) for idx in resample_indices(n, samples, seed)], dtype=torch.float64)


def evaluate(predictor: Predictor, family: Family, tasks: Iterable[tuple[str, str]], *, split: str = "test",
             corruptions: Sequence = (), batch_size: int = 256, outputs_cache: Path | None = None,
             progress: Progress | None = None, limit: int | None = None) -> list[ResultRow]:
    """tasks: (task, 'seen'|'unseen') pairs. corruptions: CorruptionSpec-like objects.
    outputs_cache: a folder for stored checkpoints' logits, scoped by the caller to what else
    decides them (suite, code, device). progress: told of each (task, condition) as it starts.
    limit: score the first `limit` examples of each task only (a smoke run)."""
    tasks = list(tasks)
    steps = [(task, task_split, None) for task, task_split in tasks]
    steps += [(task, task_split, c) for c in corruptions for task, task_split in tasks
              if c.tasks is None or task in c.tasks]
    common = dict(split=split, batch_size=batch_size, outputs_cache=outputs_cache, limit=limit)
    rows = []
    with Steps(len(steps), f"evaluating on {split}", progress) as counter:
        for task, task_split, c in steps:
            counter.next(f"{task}/{'clean' if c is None else f'{c.name}@{c.severity}'}")
            where = {} if c is None else {"condition": c.name, "severity": c.severity}
            rows += score_task(predictor, family, task, task_split=task_split, **where, **common)
    return rows
