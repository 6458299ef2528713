"""Submit: plan jobs, execute the missing ones, store complete runs.

`submit()` plans a submission into jobs (harness.planner, keyed by content hash), skips
the ones already stored, executes the rest through an executor (local by default) and
writes each returned run with its rows in one transaction. `execute_job()` is pure
with respect to the store: it fuses and evaluates and returns data, so workers on other
machines can run it while only the driver writes DuckDB. A failing method fails only
its own run.
"""

from __future__ import annotations

import functools
import itertools
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from harness import registry
from harness.errors import FbhError, SuiteUnavailable
from harness.planner import (Job, content_hash, default_suites, find_suite, harness_code_hash, plan,
                             suite_files, settings)  # noqa: F401  (suite_files/settings re-exported)
from harness.provenance import PeakMemory, device_name, git_commit, package_versions, pick_device
from harness.spec import SubmissionSpec, SuiteSpec, higher_is_better, load_submission
from harness.store import Run, Store, now
from harness.suites import require_available

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- suites

@dataclass
class SuiteHandle:
    spec: SuiteSpec
    file: Path
    zoo_dir: Path | None
    family: object


def open_suite(name: str, device, progress: Progress = print) -> SuiteHandle:
    """Load a suite's family (building its zoo first if it has one). Cached per process."""
    from harness.paths import cache_dir, suites_dir
    return _open_suite(name, str(device), progress, str(suites_dir()), str(cache_dir()))


@functools.lru_cache(maxsize=8)
def _open_suite(name: str, device: str, progress: Progress, _suites: str, _cache: str) -> SuiteHandle:
    import torch
    from harness.families import load_family
    from harness.zoo import ensure_built
    spec, path = find_suite(name)
    zoo_dir = None
    if spec.family.zoo is not None:
        zoo_dir = ensure_built(spec.family.zoo.builder, spec.family.zoo.recipe, progress=progress)
    return SuiteHandle(spec, path, zoo_dir, load_family(spec, path, zoo_dir, torch.device(device)))


# ----------------------------------------------------------------------------- outcomes

@dataclass
class Outcome:
    suite: str
    setting: str
    label: str
    status: str                  # ok | failed | cached | skipped
    run_id: str | None = None
    error: str | None = None
    mean: float | None = None


@dataclass
class SubmitReport:
    submission: str | None
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def mean_clean(rows: Iterable[dict]) -> float | None:
    rows = list(rows)
    if any(not higher_is_better(r["metric"]) for r in rows):
        return None  # errors (NYUv2 depth, normals) do not average with scores; see the leaderboard
    vals = [r["value"] for r in rows if r["condition"] == "clean" and r["task_split"] == "seen"]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- execution

@dataclass
class JobResult:
    job: Job
    run: Run
    rows: list[dict]


def _provenance(device, seed: int | None) -> dict:
    return {"device": device_name(device), "code_version": harness_code_hash(), "git_commit": git_commit(),
            "packages": package_versions(), "seed": seed}


def execute_job(job: Job, device: str = "cpu", progress: Progress = print) -> JobResult:
    """Run one job and return its run and rows; never touches the store."""
    import torch
    dev = torch.device(device)
    handle = open_suite(job.suite, dev, progress)
    if job.kind == "reference":
        return _reference(job, handle, dev, progress)
    return _submission(job, handle, dev, progress)


def _reference(job: Job, handle: SuiteHandle, device, progress: Progress) -> JobResult:
    from harness.evaluate import as_predictor, evaluate
    spec, family = handle.spec, handle.family
    progress(f"[{spec.name}] computing reference {job.label}")
    started, t0 = now(), time.perf_counter()
    if job.reference == "stl":
        rows = []
        for t in spec.task_names:
            pred = as_predictor(family.expert_state(t), family)
            rows += evaluate(pred, family, [(t, "seen")], corruptions=_corruptions_for(spec, t),
                             batch_size=spec.eval_batch_size)
    else:
        state = (family.base_state() if job.reference == "pretrained"
                 else family.load_state(spec.references.mtl, "references.mtl"))
        pred = as_predictor(state, family)
        rows = evaluate(pred, family, [(t, "seen") for t in spec.task_names], corruptions=spec.corruptions,
                        batch_size=spec.eval_batch_size)
    run = Run(run_key=job.key, kind="reference", label=job.label, suite=spec.name, setting="all",
              n_parameters=pred.num_parameters(), output_kind="merged", data_access="n/a", started_at=started,
              finished_at=now(), eval_seconds=time.perf_counter() - t0, **_provenance(device, None))
    return JobResult(job, run, [r.as_dict() for r in rows])


def _corruptions_for(spec: SuiteSpec, task: str):
    return [c for c in spec.corruptions if c.tasks is None or task in c.tasks]


def _submission(job: Job, handle: SuiteHandle, device, progress: Progress) -> JobResult:
    from harness.evaluate import evaluate
    sub = SubmissionSpec.model_validate(job.submission)
    info = registry.get(sub.method)
    spec = handle.spec
    progress(f"[{spec.name}/{job.setting}] {sub.method} on {len(job.seen)} experts")
    run = Run(run_key=job.key, kind="submission", label=sub.name, submission=sub.name, suite=spec.name,
              setting=job.setting, method=sub.method, data_access=info.data, output_kind=info.output,
              started_at=now(), **_provenance(device, sub.seed))
    try:
        ctx = fusion_context(handle, list(job.seen), info, sub.seed, device)
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            predictor, chosen, grid_scores = select_and_fuse(sub, info, ctx, handle, list(job.seen))
        run.fusion_seconds = time.perf_counter() - t0
        run.peak_memory_bytes = mem.peak
        run.params, run.grid = chosen, grid_scores
        run.data_access = info.data_used(info.validate_params(chosen)) + ("+grid:labeled_validation" if sub.grid else "")
        run.n_parameters = predictor.num_parameters()
        t0 = time.perf_counter()
        tasks = [(t, "seen") for t in job.seen] + [(t, "unseen") for t in job.unseen]
        rows = evaluate(predictor, handle.family, tasks, corruptions=spec.corruptions if job.setting == "all" else (),
                        batch_size=spec.eval_batch_size)
        run.eval_seconds = time.perf_counter() - t0
    except (KeyboardInterrupt, SystemExit, SuiteUnavailable):
        raise
    except Exception as exc:  # the method's failure is its run's, not the batch's
        run.status = "failed"
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        run.finished_at = now()
        progress(f"[{spec.name}/{job.setting}] FAILED: {run.error}")
        progress("".join(traceback.format_exception(exc)[-3:]).rstrip())
        return JobResult(job, run, [])
    run.finished_at = now()
    return JobResult(job, run, [r.as_dict() for r in rows])


def fusion_context(handle: SuiteHandle, tasks: list[str], info: registry.MethodInfo, seed: int, device):
    from harness.api import FusionContext
    family, spec = handle.family, handle.spec

    def data(task: str, split: str):
        t = spec.task(task)
        name = {"train": t.train_split, "validation": t.validation_split, "test": t.split}[split]
        if name is None:
            raise FbhError(f"task '{task}' declares no {split} split", file=str(handle.file),
                           field=f"tasks[{task}].{split}_split", fix=f"declare a {split} split for this method")
        return family.eval_data(task, name)

    return FusionContext(tasks=tasks, load_base=family.base_state, load_expert=family.expert_state,
                         build_module=family.build, logits_fn=family.logits, data_fn=data,
                         data_access=info.data, seed=seed, device=device)


def grid_points(sub: SubmissionSpec) -> list[dict]:
    if not sub.grid:
        return [dict(sub.params)]
    keys = sorted(sub.grid)
    return [{**sub.params, **dict(zip(keys, combo))} for combo in itertools.product(*(sub.grid[k] for k in keys))]


def validate_submission(sub: SubmissionSpec, file: str) -> registry.MethodInfo:
    info = registry.get(sub.method, file=file)
    for point in grid_points(sub):
        info.validate_params(point, file=file, prefix="params" if not sub.grid else "params/grid")
    return info


def fuse(info: registry.MethodInfo, ctx, params):
    import torch
    torch.manual_seed(ctx.seed)
    ctx.samples_per_task = info.samples_per_task(params)  # batches() hands out no more than declared
    return info.fn(ctx, params)


def select_and_fuse(sub: SubmissionSpec, info: registry.MethodInfo, ctx, handle: SuiteHandle, seen: list[str]):
    """Fuse once, or search the grid on the validation split only and keep the best point."""
    from harness.evaluate import as_predictor, evaluate
    points = grid_points(sub)
    if not sub.grid:
        params = info.validate_params(points[0])
        return as_predictor(fuse(info, ctx, params), handle.family), params.model_dump(mode="json"), None
    missing = [t for t in seen if handle.spec.task(t).validation_split is None]
    if missing:
        raise FbhError(f"a grid needs validation splits, but tasks {missing} declare none", file=str(handle.file),
                       field="tasks[].validation_split", fix="declare validation splits or submit fixed params")
    best, scores = None, []
    for point in points:
        params = info.validate_params(point)
        predictor = as_predictor(fuse(info, ctx, params), handle.family)
        rows = evaluate(predictor, handle.family, [(t, "seen") for t in seen], split="validation",
                        batch_size=handle.spec.eval_batch_size)
        score = sum(r.value for r in rows) / len(rows)
        scores.append({"params": params.model_dump(mode="json"), "validation_mean": score})
        if best is None or score > best[0]:
            best = (score, predictor, params.model_dump(mode="json"))
    return best[1], best[2], scores


# ----------------------------------------------------------------------------- driver

def store_published(store: Store, spec: SuiteSpec, file: Path) -> None:
    tasks = set(spec.task_names)
    for row in spec.references.published:
        key = content_hash({"published": row.model_dump(mode="json"), "suite": spec.name})
        if store.completed_run(key):
            continue
        unknown = sorted((set(row.values) | set(row.extra_values)) - tasks)
        if unknown:
            raise FbhError(f"published row '{row.label}' names unknown tasks {unknown}", file=str(file),
                           field="references.published", fix="use the suite's task names")
        results = [{"task": t, "task_split": "seen", "condition": row.condition, "severity": None,
                    "metric": spec.task(t).metric, "value": v, "n": None, "ci_low": None, "ci_high": None}
                   for t, v in row.values.items()]
        results += [{"task": t, "task_split": "seen", "condition": row.condition, "severity": None, "metric": m,
                     "value": v, "n": None, "ci_low": None, "ci_high": None}
                    for t, by_metric in row.extra_values.items() for m, v in by_metric.items()]
        store.write_run(Run(run_key=key, kind="published", label=row.label, suite=spec.name,
                            setting=row.split or "all", method=row.method, source=row.source,
                            tolerance=row.tolerance, started_at=now(), finished_at=now()), results)


def local_executor(jobs: list[Job], device: str, progress: Progress) -> Iterable[JobResult]:
    for job in jobs:
        yield execute_job(job, device, progress)


def run_jobs(store: Store, jobs: list[Job], device: str, progress: Progress,
             executor: Callable[[list[Job], str, Progress], Iterable[JobResult]] = local_executor) -> list[Outcome]:
    """Execute jobs and write each result as it arrives (only the driver writes the store)."""
    outcomes = []
    for result in executor(jobs, device, progress):
        store.write_run(result.run, result.rows)
        o = result.run
        outcomes.append(Outcome(o.suite, o.setting, o.label, o.status, o.run_id, o.error, mean_clean(result.rows)))
    return outcomes


def available_suites(specs: list[tuple[SuiteSpec, Path]], report: SubmitReport, label: str,
                     progress: Progress) -> list[tuple[SuiteSpec, Path]]:
    """Among several suites, skip (and say so) those whose models or data are not here; one
    suite asked for alone that cannot run is a user error (exit 2)."""
    available = []
    for spec, file in specs:
        try:
            require_available(spec, file)
            available.append((spec, file))
        except SuiteUnavailable as exc:
            if len(specs) == 1:
                raise
            progress(f"[{spec.name}] skipped: {exc.message}")
            report.outcomes.append(Outcome(spec.name, "all", label, "skipped", error=exc.message))
    if not available:
        raise SuiteUnavailable(f"none of the suites {[s.name for s, _ in specs]} is available here",
                               field="--suite", fix="see `fbh suites list`; " + report.outcomes[0].error)
    return available


def submit(submission_path: Path | str, *, suites: list[str] | None = None, db: Path | str | None = None,
           device: str = "auto", progress: Progress = print, force: bool = False,
           executor=local_executor) -> SubmitReport:
    from harness.paths import default_db
    path = Path(submission_path)
    sub = load_submission(path)
    if not suites and sub.suites:
        unknown = [n for n in sub.suites if n not in suite_files()]
        if unknown:
            raise FbhError(f"unknown suites {unknown}", file=str(path), field="suites",
                           fix=f"use names from `fbh suites list`: {', '.join(suite_files())}")
    names = suites or sub.suites or default_suites()
    if not names:
        raise FbhError("no suite to run", file=str(path), field="suites",
                       fix="pass --suite NAME or mark a suite `default: true`")
    specs = [find_suite(n) for n in names]  # every suite is validated before any work
    report = SubmitReport(sub.name)
    specs = available_suites(specs, report, sub.name, progress)
    suites_ = [s for s, _ in specs]
    candidate, _ = plan(sub, suites_, set(), force=True, file=str(path))
    store = Store(db or default_db())
    done = store.completed_keys([j.key for j in candidate])
    todo, cached = plan(sub, suites_, done, force=force, file=str(path))
    if todo:  # a stored run proves its params were valid; anything new is validated before any write
        validate_submission(sub, str(path))
    store.upsert_submission(sub.model_dump(mode="json"), content_hash(sub.model_dump(mode="json")), str(path))
    for spec, file in specs:
        store.upsert_suite(spec.model_dump(mode="json"), content_hash(spec.model_dump(mode="json")))
        store_published(store, spec, file)
    report.outcomes += [Outcome(j.suite, j.setting, j.label, "cached") for j in cached]
    if todo:
        # A remote executor decides 'auto' on its workers' hardware, not the driver's.
        dev = device if getattr(executor, "resolves_device", False) else str(pick_device(device))
        report.outcomes += run_jobs(store, todo, dev, progress, executor)
    return report
