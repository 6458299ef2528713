"""Submit: fuse and evaluate a submission on suites, and store complete runs.

For every suite the runner (1) makes sure the zoo is built and the reference rows
(pretrained, STL, MTL, published) are stored, then (2) for every setting (all tasks,
and each generalization split) fuses with the submission's method, evaluates, and
writes one run with its result rows. Runs are keyed by a content hash: unchanged work
is never recomputed, and a failing method fails only its own run.
"""

from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from harness import registry
from harness.api import FusionContext
from harness.errors import FbhError, SuiteUnavailable
from harness.evaluate import Predictor, as_predictor, evaluate
from harness.families import Family, load_family
from harness.paths import suites_dir
from harness.provenance import (PeakMemory, content_hash, device_name, git_commit, harness_code_hash,
                                package_versions, pick_device)
from harness.spec import SubmissionSpec, SuiteSpec, load_submission, load_suite
from harness.store import Run, Store, now
from harness.zoo import ensure_built, zoo_key, resolved_recipe

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- suites

def suite_files() -> dict[str, Path]:
    """Suite name -> file, for every suites/*.yaml. Names come from the files themselves."""
    out: dict[str, Path] = {}
    for path in sorted(suites_dir().glob("*.yaml")):
        name = path.stem
        out[name] = path
    return out


def find_suite(name: str) -> tuple[SuiteSpec, Path]:
    files = suite_files()
    path = files.get(name)
    if path is None:
        raise FbhError(f"unknown suite '{name}'", field="--suite",
                       fix=f"use one of: {', '.join(files) or '(no suites found)'} (see `fbh suites list`)")
    suite = load_suite(path)
    if suite.name != path.stem:
        raise FbhError(f"suite name '{suite.name}' does not match its file name", file=str(path), field="name",
                       fix=f"rename the file to {suite.name}.yaml or set name: {path.stem}")
    return suite, path


def default_suites() -> list[str]:
    names = []
    for name in suite_files():
        suite, _ = find_suite(name)
        if suite.default:
            names.append(name)
    return names


@dataclass
class SuiteHandle:
    spec: SuiteSpec
    file: Path
    zoo_dir: Path | None
    family: Family
    zoo_id: str | None

    @property
    def spec_hash(self) -> str:
        return content_hash(self.spec.model_dump(mode="json"))


def open_suite(name: str, device: torch.device, progress: Progress = print, build: bool = True) -> SuiteHandle:
    spec, path = find_suite(name)
    zoo_dir = zoo_id = None
    if spec.family.zoo is not None:
        recipe = resolved_recipe(spec.family.zoo.builder, spec.family.zoo.recipe)
        zoo_id = zoo_key(spec.family.zoo.builder, recipe)
        if build:
            zoo_dir = ensure_built(spec.family.zoo.builder, spec.family.zoo.recipe, progress=progress)
    return SuiteHandle(spec, path, zoo_dir, load_family(spec, path, zoo_dir, device), zoo_id)


def settings(suite: SuiteSpec) -> list[tuple[str, list[str], list[str]]]:
    """(setting name, seen tasks, unseen tasks): all tasks, then each generalization split."""
    out = [("all", suite.task_names, [])]
    out += [(g.name, list(g.seen), list(g.unseen)) for g in suite.generalization]
    return out


# ----------------------------------------------------------------------------- outcomes

@dataclass
class Outcome:
    suite: str
    setting: str
    label: str
    status: str                  # ok | failed | cached
    run_id: str | None = None
    error: str | None = None
    mean: float | None = None


@dataclass
class SubmitReport:
    submission: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def provenance(device: torch.device, seed: int | None) -> dict:
    return {"device": device_name(device), "code_version": harness_code_hash(), "git_commit": git_commit(),
            "packages": package_versions(), "seed": seed}


def mean_clean(rows) -> float | None:
    vals = [r.value for r in rows if r.condition == "clean" and r.task_split == "seen"]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- references

def reference_key(handle: SuiteHandle, label: str) -> str:
    return content_hash({"reference": label, "suite": handle.spec_hash, "zoo": handle.zoo_id,
                         "code": harness_code_hash()})


def store_published(store: Store, handle: SuiteHandle) -> None:
    for row in handle.spec.references.published:
        key = content_hash({"published": row.model_dump(mode="json"), "suite": handle.spec.name})
        if store.completed_run(key):
            continue
        tasks = set(handle.spec.task_names)
        results = [{"task": t, "task_split": "seen", "condition": row.condition, "severity": None,
                    "metric": handle.spec.task(t).metric, "value": v, "n": None, "ci_low": None, "ci_high": None}
                   for t, v in row.values.items() if t in tasks]
        unknown = sorted(set(row.values) - tasks)
        if unknown:
            raise FbhError(f"published row '{row.label}' names unknown tasks {unknown}", file=str(handle.file),
                           field="references.published", fix="use the suite's task names")
        store.write_run(Run(run_key=key, kind="published", label=row.label, suite=handle.spec.name,
                            setting=row.split or "all", method=row.method, source=row.source,
                            tolerance=row.tolerance, started_at=now(), finished_at=now()), results)


def ensure_references(store: Store, handle: SuiteHandle, device: torch.device, progress: Progress) -> list[Outcome]:
    spec, family = handle.spec, handle.family
    store.upsert_suite(spec.model_dump(mode="json"), handle.spec_hash)
    store_published(store, handle)
    outcomes = []
    all_tasks = [(t, "seen") for t in spec.task_names]
    for ref in spec.references.computed:
        label = {"pretrained": "pretrained", "stl": "STL", "mtl": "MTL"}[ref]
        key = reference_key(handle, label)
        if store.completed_run(key):
            outcomes.append(Outcome(spec.name, "all", label, "cached"))
            continue
        progress(f"[{spec.name}] computing reference {label}")
        started, t0 = now(), time.perf_counter()
        if ref == "stl":
            rows = []
            for t in spec.task_names:
                pred = as_predictor(family.expert_state(t), family)
                rows += evaluate(pred, family, [(t, "seen")], corruptions=_for_task(spec, t),
                                 batch_size=spec.eval_batch_size)
            n_params = pred.num_parameters()
        else:
            state = family.base_state() if ref == "pretrained" else family.load_state(spec.references.mtl,
                                                                                       "references.mtl")
            pred = as_predictor(state, family)
            rows = evaluate(pred, family, all_tasks, corruptions=spec.corruptions, batch_size=spec.eval_batch_size)
            n_params = pred.num_parameters()
        run = Run(run_key=key, kind="reference", label=label, suite=spec.name, n_parameters=n_params,
                  output_kind="merged", data_access="n/a", started_at=started, finished_at=now(),
                  eval_seconds=time.perf_counter() - t0, **provenance(device, None))
        store.write_run(run, [r.as_dict() for r in rows])
        outcomes.append(Outcome(spec.name, "all", label, "ok", run.run_id, mean=mean_clean(rows)))
    return outcomes


def _for_task(spec: SuiteSpec, task: str):
    return [c for c in spec.corruptions if c.tasks is None or task in c.tasks]


# ----------------------------------------------------------------------------- submissions

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


def submission_key(sub: SubmissionSpec, info: registry.MethodInfo, handle: SuiteHandle, setting: str) -> str:
    return content_hash({"name": sub.name, "method": sub.method, "params": sub.params, "grid": sub.grid,
                         "seed": sub.seed, "method_code": info.code_hash(), "suite": handle.spec_hash,
                         "zoo": handle.zoo_id, "setting": setting, "harness": harness_code_hash()})


def fusion_context(handle: SuiteHandle, tasks: list[str], info: registry.MethodInfo, seed: int,
                   device: torch.device) -> FusionContext:
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


def fuse(info: registry.MethodInfo, ctx: FusionContext, params) -> object:
    torch.manual_seed(ctx.seed)
    ctx.samples_per_task = info.samples_per_task(params)  # batches() hands out no more than declared
    return info.fn(ctx, params)


def run_setting(store: Store, sub: SubmissionSpec, info: registry.MethodInfo, handle: SuiteHandle,
                setting: tuple[str, list[str], list[str]], device: torch.device, progress: Progress,
                force: bool = False) -> Outcome:
    name, seen, unseen = setting
    spec, family = handle.spec, handle.family
    key = submission_key(sub, info, handle, name)
    if not force:
        done = store.completed_run(key)
        if done:
            return Outcome(spec.name, name, sub.name, "cached", done["run_id"])
    progress(f"[{spec.name}/{name}] {sub.method} on {len(seen)} experts")
    run = Run(run_key=key, kind="submission", label=sub.name, submission=sub.name, suite=spec.name,
              setting=name, method=sub.method, data_access=info.data, output_kind=info.output,
              started_at=now(), **provenance(device, sub.seed))
    try:
        ctx = fusion_context(handle, seen, info, sub.seed, device)
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            predictor, chosen, grid_scores = select_and_fuse(sub, info, ctx, handle, seen)
        run.fusion_seconds = time.perf_counter() - t0
        run.peak_memory_bytes = mem.peak
        run.params, run.grid = chosen, grid_scores
        run.data_access = info.data_used(info.validate_params(chosen)) + ("+grid:labeled_validation" if sub.grid else "")
        run.n_parameters = predictor.num_parameters()
        t0 = time.perf_counter()
        tasks = [(t, "seen") for t in seen] + [(t, "unseen") for t in unseen]
        rows = evaluate(predictor, family, tasks, corruptions=spec.corruptions if name == "all" else (),
                        batch_size=spec.eval_batch_size)
        run.eval_seconds = time.perf_counter() - t0
    except (KeyboardInterrupt, SystemExit, SuiteUnavailable):
        raise
    except Exception as exc:  # the method's failure is its run's, not the batch's
        run.status = "failed"
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        run.finished_at = now()
        progress(f"[{spec.name}/{name}] FAILED: {run.error}")
        progress("".join(traceback.format_exception(exc)[-3:]).rstrip())
        store.write_run(run, [])
        return Outcome(spec.name, name, sub.name, "failed", run.run_id, run.error)
    run.finished_at = now()
    store.write_run(run, [r.as_dict() for r in rows])
    return Outcome(spec.name, name, sub.name, "ok", run.run_id, mean=mean_clean(rows))


def select_and_fuse(sub: SubmissionSpec, info: registry.MethodInfo, ctx: FusionContext, handle: SuiteHandle,
                    seen: list[str]) -> tuple[Predictor, dict, list | None]:
    """Fuse once, or search the grid on the validation split only and keep the best point."""
    points = grid_points(sub)
    if len(points) == 1 and not sub.grid:
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


def submit(submission_path: Path | str, *, suites: list[str] | None = None, db: Path | str | None = None,
           device: str = "auto", progress: Progress = print, force: bool = False) -> SubmitReport:
    from harness.paths import default_db
    path = Path(submission_path)
    sub = load_submission(path)
    info = validate_submission(sub, str(path))
    names = suites or sub.suites or default_suites()
    if not names:
        raise FbhError("no suite to run", file=str(path), field="suites",
                       fix="pass --suite NAME or mark a suite `default: true`")
    handles_specs = [find_suite(n) for n in names]  # validate every suite before any work
    dev = pick_device(device)
    store = Store(db or default_db())
    store.upsert_submission(sub.model_dump(mode="json"), content_hash(sub.model_dump(mode="json")), str(path))
    report = SubmitReport(sub.name)
    for (spec, _file) in handles_specs:
        handle = open_suite(spec.name, dev, progress)
        report.outcomes += ensure_references(store, handle, dev, progress)
        for setting in settings(spec):
            report.outcomes.append(run_setting(store, sub, info, handle, setting, dev, progress, force))
    return report
