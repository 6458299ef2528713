"""Submit: plan jobs, execute the missing ones, store complete runs.

`submit()` plans a submission into jobs (harness.planner, keyed by content hash), skips
the ones already stored, executes the rest through an executor (local by default) and
writes each returned run with its rows in one transaction. `execute_job()` is pure
with respect to the store: it fuses and evaluates and returns data, so workers on other
machines can run it while only the driver writes DuckDB. A failing method fails only
its own run.

A grid submission runs in two rounds: one job per grid point (validation scores only),
then, in the driver, selection of the best point on validation and one job that fuses
that point and evaluates it on test: the submission's leaderboard run, which records the
selected params and every point's validation score.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from harness import registry
from harness.digests import CorruptFile
from harness.errors import FbhError, MethodFailed, SuiteUnavailable
from harness.isolation import BUDGET_FIX, fusion_processes, is_approved, isolated_fuse
from harness.planner import (GridSearch, Job, SuiteInputs, all_keys, content_hash, default_suites, find_suite,
                             grid_points, harness_code_hash, plan, suite_files, settings)  # noqa: F401  (re-exported)
from harness.metrics import higher_is_better
from harness.provenance import device_name, git_commit, package_versions, pick_device
from harness.spec import SubmissionSpec, SuiteSpec, load_submission
from harness.store import Run, Store, now
from harness.suites import require_available
from harness.validate import check_name_owned, validate_submission

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- suites

def suite_inputs(spec: SuiteSpec, file: Path, progress: Progress = print,
                 announce: bool = False) -> tuple[Path | None, SuiteInputs]:
    """What the suite's runs would be computed on here: its zoo built (and every file of it checked
    against the digests written at build time) or its hub snapshots found, and the fingerprint.
    announce: say when the zoo is not the one the suite file pins."""
    from harness.identity import fingerprint, resolve_inputs
    zoo_dir = None
    if spec.family.zoo is not None:
        from harness.zoo import ensure_built, ensure_suite_zoo
        zoo_dir = (ensure_suite_zoo(spec.family.zoo, file, progress=progress) if announce
                   else ensure_built(spec.family.zoo.builder, spec.family.zoo.recipe, progress=progress))
    inputs = resolve_inputs(spec, file, zoo_dir)
    return zoo_dir, SuiteInputs(fingerprint(spec, inputs), inputs)


@dataclass
class SuiteHandle:
    spec: SuiteSpec
    file: Path
    zoo_dir: Path | None
    family: object
    on: SuiteInputs
    reuse_outputs: bool = True  # False: every logit is computed afresh (fbh reproduce)

    @functools.cached_property
    def outputs_cache(self) -> Path:
        """Where stored checkpoints' logits on this suite's evaluation sets are kept, so every
        ensemble and reference computes an expert's outputs once: scoped by what else decides
        them (the suite's fingerprint, the harness code, the device the family runs on)."""
        from harness.paths import cache_dir
        scope = content_hash({"fingerprint": self.on.fingerprint, "code": harness_code_hash(),
                              "device": str(self.family.device)})
        return cache_dir() / "outputs" / scope[:16]

    @property
    def outputs(self) -> Path | None:
        return self.outputs_cache if self.reuse_outputs else None

    def check(self, job: Job, progress: Progress) -> None:
        """The job runs on what it was planned on: every input is checked again (cheap once
        verified: a stat per file) and must give the job's fingerprint."""
        _, now_on = suite_inputs(self.spec, self.file, progress)
        if job.fingerprint and now_on.fingerprint != job.fingerprint:
            changed = sorted(k for k in {**now_on.inputs, **(job.inputs or {})}
                             if now_on.inputs.get(k) != (job.inputs or {}).get(k))
            raise FbhError(f"the suite's inputs are not those the job was planned on (fingerprint "
                           f"{now_on.fingerprint}, planned {job.fingerprint}; changed: {', '.join(changed) or 'spec'})",
                           file=str(self.file), fix="submit again: planning records what is on this machine now")


def open_suite(name: str, device, progress: Progress = print) -> SuiteHandle:
    """Load a suite's family (building its zoo first if it has one). Cached per process."""
    from harness.paths import cache_dir, suites_dir
    return _open_suite(name, str(device), progress, str(suites_dir()), str(cache_dir()))


@functools.lru_cache(maxsize=8)
def _open_suite(name: str, device: str, progress: Progress, _suites: str, _cache: str) -> SuiteHandle:
    import torch
    from harness.families import load_family
    spec, path = find_suite(name)
    zoo_dir, on = suite_inputs(spec, path, progress, announce=True)  # once per process: says so if not the pinned zoo
    return SuiteHandle(spec, path, zoo_dir, load_family(spec, path, zoo_dir, torch.device(device)), on)


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
    fusion_seconds: float | None = None
    eval_seconds: float | None = None


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


def _provenance(device, seed: int | None, job: Job) -> dict:
    """What a run was computed with and on: code, packages, device, and the suite's inputs."""
    return {"device": device_name(device), "code_version": harness_code_hash(), "git_commit": git_commit(),
            "packages": package_versions(), "seed": seed, **identity_fields(job)}


def identity_fields(job: Job) -> dict:
    return {"fingerprint": job.fingerprint or None, "inputs": job.inputs, "job": job.as_dict(),
            "example_limit": job.limit}


def execute_job(job: Job, device: str = "cpu", progress: Progress = print, reuse_outputs: bool = True) -> JobResult:
    """Run one job and return its run and rows; never touches the store. reuse_outputs=False computes
    every stored checkpoint's logits again instead of reading the outputs cache."""
    import torch
    dev = torch.device(device)
    handle = dataclasses.replace(open_suite(job.suite, dev, progress), reuse_outputs=reuse_outputs)
    handle.check(job, progress)
    if job.kind == "reference":
        return _reference(job, handle, dev, progress)
    if job.kind == "grid_point":
        return _grid_point(job, handle, dev, progress)
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
                             batch_size=spec.eval_batch_size, outputs_cache=handle.outputs, progress=progress,
                             limit=job.limit)
    else:
        state = (family.base_state() if job.reference == "pretrained"
                 else family.load_state(spec.references.mtl, "references.mtl"))
        pred = as_predictor(state, family)
        rows = evaluate(pred, family, [(t, "seen") for t in spec.task_names], corruptions=spec.corruptions,
                        batch_size=spec.eval_batch_size, outputs_cache=handle.outputs, progress=progress,
                        limit=job.limit)
    run = Run(run_key=job.key, kind="reference", label=job.label, suite=spec.name, setting="all",
              n_parameters=pred.num_parameters(), output_kind="merged", data_access="n/a", started_at=started,
              finished_at=now(), eval_seconds=time.perf_counter() - t0, **_provenance(device, None, job))
    return JobResult(job, run, [r.as_dict() for r in rows])


def _corruptions_for(spec: SuiteSpec, task: str):
    return [c for c in spec.corruptions if c.tasks is None or task in c.tasks]


def _submission(job: Job, handle: SuiteHandle, device, progress: Progress) -> JobResult:
    """A submission's leaderboard run: fuse with its params (for a grid, the point selected
    on validation by the driver) and evaluate on test, corruptions included in 'all'."""
    sub = SubmissionSpec.model_validate(job.submission)
    params = job.params if job.params is not None else grid_points(sub)[0]
    run, result = _fuse_and_score(job, handle, device, progress, params, submission_scorer(job, handle, progress))
    if job.selection is not None and run.status == "ok":
        # The leaderboard shows what the whole search cost, as when it ran in one process.
        run.grid = job.selection["grid"]
        run.fusion_seconds = job.selection["search_seconds"]
        run.peak_memory_bytes = max(run.peak_memory_bytes or 0, job.selection["peak_memory_bytes"] or 0)
        run.data_access += "+grid:labeled_validation"
    return result


def submission_scorer(job: Job, handle: SuiteHandle, progress: Progress | None = None) -> Callable:
    """predictor -> result rows of a submission's run: its setting's tasks on test, corruptions in 'all'."""
    from harness.evaluate import evaluate
    tasks = [(t, "seen") for t in job.seen] + [(t, "unseen") for t in job.unseen]
    corruptions = handle.spec.corruptions if job.setting == "all" else ()
    return lambda predictor: evaluate(predictor, handle.family, tasks, corruptions=corruptions,
                                      batch_size=handle.spec.eval_batch_size, outputs_cache=handle.outputs,
                                      progress=progress, limit=job.limit)


def _grid_point(job: Job, handle: SuiteHandle, device, progress: Progress) -> JobResult:
    """One grid point, scored on the validation split of the seen tasks only: the test split
    is evaluated for the selected point alone."""
    from harness.evaluate import evaluate
    tasks = [(t, "seen") for t in job.seen]
    _, result = _fuse_and_score(job, handle, device, progress, job.params,
                                lambda predictor: evaluate(predictor, handle.family, tasks, split="validation",
                                                           batch_size=handle.spec.eval_batch_size,
                                                           outputs_cache=handle.outputs, progress=progress,
                                                           limit=job.limit))
    return result


def _fuse_and_score(job: Job, handle: SuiteHandle, device, progress: Progress, params: dict,
                    score: Callable) -> tuple[Run, JobResult]:
    """Fuse with params and score the result; a method's failure fails its run, not the batch."""
    from harness.evaluate import as_predictor
    sub = SubmissionSpec.model_validate(job.submission)
    info = registry.get(sub.method)
    spec = handle.spec
    progress(f"[{spec.name}/{job.setting}] {job.label}: {sub.method} on {len(job.seen)} experts")
    run = Run(run_key=job.key, kind=job.kind, label=job.label, submission=sub.name, suite=spec.name,
              setting=job.setting, method=sub.method, data_access=info.data, output_kind=info.output,
              started_at=now(), **_provenance(device, sub.seed, job))
    try:
        validated = info.validate_params(params)
        fused = isolated_fuse(handle, list(job.seen), info, validated, sub.seed, device,
                              budget=handle.spec.fusion_budget_seconds, progress=progress)
        predictor = as_predictor(fused.value, handle.family)
        run.fusion_seconds = fused.seconds
        check_budget(run.fusion_seconds, handle)
        run.peak_memory_bytes = fused.peak_memory_bytes
        run.data_access_verified = fused.verified or is_approved(info)
        run.params = validated.model_dump(mode="json")
        run.data_access = info.data_used(validated)
        run.n_parameters = predictor.num_parameters()
        t0 = time.perf_counter()
        rows = score(predictor)
        run.eval_seconds = time.perf_counter() - t0
    except (KeyboardInterrupt, SystemExit, SuiteUnavailable, CorruptFile):  # the inputs' fault, not the method's
        raise
    except Exception as exc:  # the method's failure is its run's, not the batch's
        run.status = "failed"
        run.error = (str(exc) if isinstance(exc, MethodFailed) else f"{type(exc).__name__}: {exc}")[:2000]
        run.finished_at = now()
        progress(f"[{spec.name}/{job.setting}] {job.label} FAILED: {run.error}")
        if not isinstance(exc, MethodFailed):  # the fusion process has printed its own
            progress("".join(traceback.format_exception(exc)[-3:]).rstrip())
        return run, JobResult(job, run, [])
    run.finished_at = now()
    return run, JobResult(job, run, [r.as_dict() for r in rows])


def check_budget(seconds: float, handle: SuiteHandle) -> None:
    budget = handle.spec.fusion_budget_seconds
    if budget is not None and seconds > budget:
        raise FbhError(f"fusion took {seconds:.1f} s, over the suite's budget of {budget:g} s", file=str(handle.file),
                       field="fusion_budget_seconds", fix=BUDGET_FIX)


def fuse(info: registry.MethodInfo, ctx, params):
    """In this process (tests of the methods themselves); runs go through isolated_fuse."""
    from harness.fusion_worker import fuse as fuse_in_this_process
    return fuse_in_this_process(info, ctx, params)


# ----------------------------------------------------------------------------- driver

def store_suite(store: Store, spec: SuiteSpec, on: SuiteInputs, progress: Progress) -> None:
    """The suite row: its spec, the fingerprint this submit computes on, and the one its file pins."""
    from harness.identity import expected_fingerprint
    expected = expected_fingerprint(spec)
    if expected is not None and expected != on.fingerprint and spec.family.zoo is None:  # a zoo says so itself
        progress(f"[{spec.name}] computing on fingerprint {on.fingerprint}, not the {expected} the suite file "
                 "pins: these rows are ranked apart from runs on the pinned inputs")
    spec_json = spec.model_dump(mode="json")
    store.upsert_suite(spec_json, content_hash(spec_json), on.fingerprint, expected, on.inputs)


def store_published(store: Store, spec: SuiteSpec, file: Path) -> None:
    for row in spec.references.published:
        key = content_hash({"published": row.model_dump(mode="json"), "suite": spec.name})
        if store.completed_run(key):
            continue
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
    for i, job in enumerate(jobs, 1):
        progress(f"[{i}/{len(jobs)}] {job.suite}/{job.setting}: {job.label}")
        yield execute_job(job, device, progress)


def run_jobs(store: Store, jobs: list[Job], device: str, progress: Progress,
             executor: Callable[[list[Job], str, Progress], Iterable[JobResult]] = local_executor) -> list[Outcome]:
    """Execute jobs and write each result as it arrives (only the driver writes the store)."""
    outcomes = []
    if not jobs:
        return outcomes
    for result in executor(jobs, device, progress):
        store.write_run(result.run, result.rows)
        outcomes.append(outcome(result))
    return outcomes


POINT_ROWS = """
SELECT r.run_key, r.params, r.fusion_seconds, r.eval_seconds, r.peak_memory_bytes, x.task, x.metric, x.value
FROM runs r JOIN results x USING (run_id)
WHERE r.status = 'ok' AND x.condition = 'clean' AND r.run_key IN (SELECT unnest(?::VARCHAR[]))
"""


def point_scores(values: list[dict[str, float]], metrics: dict[str, str]) -> tuple[list[float | None], list[float]]:
    """Each grid point's validation mean (None where tasks' primary metrics differ, as
    accuracy and depth error cannot be averaged) and its selection score, higher better:
    the mean of the one primary metric (negated for errors), else the mean over tasks of
    the point's rank among the points. `values[i]` maps task -> primary-metric value."""
    tasks = sorted(set().union(*values)) if values else []
    names = {metrics[t] for t in tasks}
    sign = {t: 1.0 if higher_is_better(metrics[t]) else -1.0 for t in tasks}
    if len(names) <= 1:
        means = [sum(v[t] for t in tasks) / len(tasks) if tasks else 0.0 for v in values]
        return means, [m if not tasks or sign[tasks[0]] > 0 else -m for m in means]
    ranks = [0.0] * len(values)
    for t in tasks:
        signed = [sign[t] * v[t] for v in values]
        for i, x in enumerate(signed):  # tied points share the mean of their ranks
            ranks[i] += (sum(y < x for y in signed) + (sum(y == x for y in signed) - 1) / 2) / len(tasks)
    return [None] * len(values), ranks


def select_points(store: Store, searches: list[GridSearch], primary: dict[str, dict[str, str]]
                  ) -> tuple[list[Job], list[JobResult]]:
    """For each grid search whose points are all stored, the selected job: the best point on
    the validation split's primary metrics (`primary`: suite -> task -> metric; see
    point_scores), the first in grid order on a tie, carrying every point's score. A search
    with a failed point cannot be decided honestly (the failed point might have been the
    best), so its leaderboard run fails, naming the points."""
    keys = [p.key for s in searches for p in s.points]
    suite_of = {p.key: p.suite for s in searches for p in s.points}
    stored: dict[str, dict] = {}
    for r in (store.query(POINT_ROWS, [keys]) if keys else []):
        point = stored.setdefault(r["run_key"], {**r, "values": {}})
        if r["metric"] == primary[suite_of[r["run_key"]]].get(r["task"]):
            point["values"][r["task"]] = r["value"]
    selected, failed = [], []
    for search in searches:
        missing = [p.label for p in search.points if p.key not in stored]
        if missing:
            run = Run(run_key=search.selected.key, kind="submission", label=search.selected.label,
                      submission=search.selected.label, suite=search.selected.suite, setting=search.selected.setting,
                      method=(search.selected.submission or {}).get("method"), status="failed",
                      error=f"grid point(s) {', '.join(missing)} failed; nothing selected", started_at=now(),
                      finished_at=now(), **identity_fields(search.selected))
            failed.append(JobResult(search.selected, run, []))
            continue
        points = [stored[p.key] for p in search.points]
        means, scores = point_scores([r["values"] for r in points], primary[search.selected.suite])
        grid = [{"params": json.loads(r["params"]), "validation_mean": m, "validation_score": sc}
                for r, m, sc in zip(points, means, scores)]
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        selection = {"grid": grid,
                     "search_seconds": sum((r["fusion_seconds"] or 0) + (r["eval_seconds"] or 0) for r in points),
                     "peak_memory_bytes": max(r["peak_memory_bytes"] or 0 for r in points)}
        selected.append(dataclasses.replace(search.selected, params=grid[best]["params"], selection=selection))
    return selected, failed


def outcome(result: JobResult) -> Outcome:
    r = result.run
    return Outcome(r.suite, r.setting, r.label, r.status, r.run_id, r.error, mean_clean(result.rows),
                   r.fusion_seconds, r.eval_seconds)


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
           executor=local_executor, limit: int | None = None) -> SubmitReport:
    from harness.paths import default_db
    path = Path(submission_path)
    sub = load_submission(path)
    if not suites and sub.suites:
        unknown = [n for n in sub.suites if n not in suite_files()]
        if unknown:
            raise FbhError(f"unknown suites {unknown}", file=str(path), field="suites",
                           fix=f"use names from `fbh suites list`: {', '.join(suite_files())}")
    names = list(dict.fromkeys(suites or sub.suites or default_suites()))  # a suite named twice runs once
    if not names:
        raise FbhError("no suite to run", file=str(path), field="suites",
                       fix="pass --suite NAME or mark a suite `default: true`")
    specs = [find_suite(n) for n in names]  # every suite is validated before any work
    report = SubmitReport(sub.name)
    specs = available_suites(specs, report, sub.name, progress)
    check_name_owned(sub.name, path)
    remote = getattr(executor, "resolves_device", False)  # a remote executor decides on its workers' hardware
    if device == "cuda" and not remote:
        pick_device(device)  # no GPU here is a user error, said before anything is written
    suites_ = [(s, suite_inputs(s, f, progress)[1]) for s, f in specs]  # builds and checks zoos first
    store = Store(db or default_db())
    check_name_owned(sub.name, path, store.submission_source(sub.name))
    done = store.completed_keys(all_keys(plan(sub, suites_, set(), force=True, file=str(path), limit=limit)))
    todo = plan(sub, suites_, done, force=force, file=str(path), limit=limit)
    if todo.todo or todo.searches:  # a stored run proves its params were valid; anything new is validated first
        validate_submission(sub, str(path))
        from harness.paths import writable_cache
        writable_cache()  # runs write preprocessed test sets and outputs there: said now, not after the writes
    store.upsert_submission(sub.model_dump(mode="json"), content_hash(sub.model_dump(mode="json")),
                            str(path.resolve()))
    for (spec, file), (_, on) in zip(specs, suites_):
        store_suite(store, spec, on, progress)
        store_published(store, spec, file)
    report.outcomes += [Outcome(j.suite, j.setting, j.label, "cached") for j in todo.cached]
    if todo.todo or todo.searches:
        if not remote and any(j.kind != "reference" for j in todo.todo):
            fusion_processes(specs[0][0].family.kind)  # started now, its imports overlap the references'
        dev = device if remote else str(pick_device(device))
        report.outcomes += run_jobs(store, todo.todo, dev, progress, executor)
        # Grid points first, then the selected point of each search: selection reads only
        # stored validation scores, so points from an interrupted earlier submit count too.
        selected, undecided = select_points(store, todo.searches,
                                             {s.name: {t.name: t.metric for t in s.tasks} for s, _ in suites_})
        for result in undecided:
            store.write_run(result.run, result.rows)
            report.outcomes.append(outcome(result))
        report.outcomes += run_jobs(store, selected, dev, progress, executor)
    for spec, on in suites_:
        store.supersede_other_seeds(sub.name, spec.name, on.fingerprint, limit, sub.run_seeds())
    return report
