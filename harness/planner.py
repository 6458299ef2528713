"""Plan a submission into independent jobs keyed by content hashes, without loading models.

A job is one (suite, setting, submission-or-reference) pair, or one grid point of a
submission's setting. Its key hashes everything its result depends on: the submission
(name, method, params, grid, seed; a grid point's own params instead of the grid), the
method's code (from the registry: its module and the modules of methods/ it imports), the
setting (its kind, name and tasks), the suite's fingerprint (its result-shaping spec and the
content identity of every model and data input, harness.identity), and the harness modules that
shape results. Code is hashed by its syntax, so a comment or a docstring re-keys nothing.
The registry is what says which code a method is (harness.registry.code_identity: a process
that has not imported the methods reads the index of their modules its last discovery wrote,
while no file of methods/ has changed, so planning an unchanged re-submit imports no torch).
Planning loads no model, so an unchanged re-submit is answered from the store at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import __version__, registry
from harness.code_identity import code_digest
from harness.errors import FbhError
from harness.paths import suites_dir
from harness.spec import SubmissionSpec, SuiteSpec, load_suite

REFERENCE_LABELS = {"pretrained": "pretrained", "stl": "STL", "mtl": "MTL"}
HARNESS_DIR = Path(__file__).parent
# The harness modules a run's numbers depend on (relative to harness/), hashed into every run key.
# The others present results (site, leaderboard, cli, ci), store or schedule them (store,
# executors, locks, provenance), check input (validate, suites), write suite files
# (families/catalog.py), or build the keys themselves (planner, code_identity: the settings,
# tasks and params they decide are key data). The zoo is keyed by its own entry.
RESULT_SHAPING_MODULES = (
    "api.py",                       # what a method is handed: FusionContext, its data batches, Ensemble
    "corruptions.py",               # the corrupted test sets
    "evaluate.py",                  # predicting, metrics and their intervals
    "families/__init__.py",         # which adapter a suite's family kind loads
    "families/clip_vision.py",      # the model families: loading, running and scoring models
    "families/common.py",
    "families/flan_t5.py",
    "families/gpt2_classification.py",
    "families/open_clip_vision.py",
    "families/resnet_nyuv2.py",
    "metrics.py",                   # each metric's direction (grid selection) and aggregation
    "moe.py",                       # upscaled modules of the mixing methods
    "pool.py",                      # reading checkpoints' tensors
    "predictor.py",                 # combining ensemble members' outputs
    "registry.py",                  # a method's params as validated, and how many examples it may read
    "runner.py",                    # seeds, the data and corruptions each run sees, grid-point selection
    "sources.py",                   # which files a suite's model and data references load
    "spec.py",                      # the validated suite and submission fields a run reads
    "tensors.py",                   # the state-dict arithmetic of merging
)


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def harness_code_hash() -> str:
    """Digest of the result-shaping harness modules' syntax (and the harness version)."""
    return code_digest({rel: HARNESS_DIR / rel for rel in RESULT_SHAPING_MODULES}, salt=__version__)


# ----------------------------------------------------------------------------- suites

def suite_files() -> dict[str, Path]:
    """Suite name -> file, for every suites/*.yaml (a suite's name is its file name)."""
    return {p.stem: p for p in sorted(suites_dir().glob("*.yaml"))}


def find_suite(name: str) -> tuple[SuiteSpec, Path]:
    files = suite_files()
    path = files.get(name)
    if path is None:
        raise FbhError(f"unknown suite '{name}'", field="--suite",
                       fix=f"use one of: {', '.join(files) or '(no suites found)'} (see `fbh suites list`)")
    return check_suite(load_suite(path), path), path


def check_suite(suite: SuiteSpec, path: Path) -> SuiteSpec:
    """Checks that need the harness's registries (the family kind, the zoo builder and its typed recipe)
    or the disk (every local input is the kind of thing its field names): `fbh validate` and `fbh submit`
    both make them, before anything is written."""
    from harness.families import FAMILIES
    from harness.suites import check_local_inputs
    if suite.name != Path(path).stem:  # `--suite NAME` finds suites/NAME.yaml
        raise FbhError(f"suite name '{suite.name}' does not match its file name", file=str(path), field="name",
                       fix=f"rename the file to {suite.name}.yaml or set name: {Path(path).stem}")
    if suite.family.kind not in FAMILIES:
        raise FbhError(f"unknown model family '{suite.family.kind}'", file=str(path), field="family.kind",
                       fix=f"use one of: {', '.join(sorted(FAMILIES))}")
    if suite.family.zoo is not None:
        from harness.zoo import resolved_recipe
        try:
            resolved_recipe(suite.family.zoo.builder, suite.family.zoo.recipe)
        except FbhError as exc:
            raise FbhError(exc.message, file=str(path), field=exc.field, fix=exc.fix) from None
    check_local_inputs(suite, path)
    return suite


def default_suites() -> list[str]:
    """The suites marked `default: true`; each is checked whole (find_suite) once it is chosen to run."""
    return [name for name, path in suite_files().items() if load_suite(path).default]


@dataclass(frozen=True)
class Setting:
    """What a submission is fused from and scored on: every task ('all'), or a generalization split."""
    kind: str                 # 'all' | 'generalization'
    name: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    def key(self) -> dict:
        """The setting's part of a run key: its kind beside its name, so a split can never be the
        'all' setting, and its tasks, which decide what is fused and scored."""
        return {"kind": self.kind, "name": self.name, "seen": list(self.seen), "unseen": list(self.unseen)}


def settings(suite: SuiteSpec) -> list[Setting]:
    """All tasks, then each generalization split."""
    return [Setting("all", "all", tuple(suite.task_names), ())] + [
        Setting("generalization", g.name, tuple(g.seen), tuple(g.unseen)) for g in suite.generalization]


# ----------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class Job:
    """One unit of work. Plain data, so it can travel to a Ray worker or a Slurm job.

    kind 'grid_point': fuse one point of a submission's grid and score it on the validation
    split of the seen tasks (never on test). kind 'submission' of a grid submission: fuse
    the point selected on validation (`params`) and evaluate it like any submission;
    `selection` carries every point's validation score and the search's cost.
    """
    key: str
    kind: str                 # 'reference' | 'submission' | 'grid_point'
    suite: str
    setting: str
    label: str                # reference label, submission name, or 'name@k=v' for a grid point
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    fingerprint: str = ""            # the suite's inputs and result-shaping spec (harness.identity)
    inputs: dict | None = None       # reference -> content identity behind that fingerprint
    submission: dict | None = None   # SubmissionSpec as JSON-able dict
    reference: str | None = None     # 'pretrained' | 'stl' | 'mtl'
    params: dict | None = None       # the hyperparameters to fuse with (grid point or selected point)
    selection: dict | None = None    # {'grid': [{params, validation_mean, validation_score}], 'search_seconds', 'peak_memory_bytes'}
    limit: int | None = None         # a smoke run: scored on the first `limit` examples of each task only

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GridSearch:
    """One setting of a grid submission: point jobs first; once every point is stored, the
    driver selects the best on validation and runs `selected` with that point's params."""
    selected: Job
    points: tuple[Job, ...]


@dataclass
class Plan:
    todo: list[Job]                 # runnable now
    cached: list[Job]               # already stored (skipped)
    searches: list[GridSearch]      # grid settings whose selected run is not stored yet


def grid_points(sub: SubmissionSpec) -> list[dict]:
    """The full params of every grid point, in the order of the sorted grid keys' product."""
    if not sub.grid:
        return [dict(sub.params)]
    keys = sorted(sub.grid)
    return [{**sub.params, **dict(zip(keys, combo))} for combo in itertools.product(*(sub.grid[k] for k in keys))]


def point_label(sub: SubmissionSpec, point: dict) -> str:
    return sub.name + "@" + ",".join(f"{k}={point[k]}" for k in sorted(sub.grid))


@dataclass(frozen=True)
class SuiteInputs:
    """What a suite's runs are computed on here: its fingerprint and the identities behind it."""
    fingerprint: str
    inputs: dict


def limited(limit: int | None) -> dict:
    """A smoke run's part of a key; nothing for a full run, so full runs keep their keys."""
    return {} if limit is None else {"limit": limit}


def reference_jobs(suite: SuiteSpec, on: SuiteInputs, limit: int | None = None) -> list[Job]:
    base = {"fingerprint": on.fingerprint, "harness": harness_code_hash(), **limited(limit)}
    return [Job(key=content_hash({"reference": REFERENCE_LABELS[ref], **base}), kind="reference",
                suite=suite.name, setting="all", label=REFERENCE_LABELS[ref], seen=tuple(suite.task_names),
                unseen=(), fingerprint=on.fingerprint, inputs=on.inputs, reference=ref, limit=limit)
            for ref in suite.references.computed]


def _submission_base(sub: SubmissionSpec, suite: SuiteSpec, on: SuiteInputs, file: str | None,
                     limit: int | None = None) -> dict:
    return {"name": sub.name, "method": sub.method, "params": sub.params, "grid": sub.grid, "seed": sub.seed,
            "method_code": registry.code_identity(sub.method, file), "fingerprint": on.fingerprint,
            "harness": harness_code_hash(), **limited(limit)}


def submission_jobs(sub: SubmissionSpec, suite: SuiteSpec, on: SuiteInputs, file: str | None = None,
                    limit: int | None = None) -> list[tuple[Setting, Job]]:
    """One job per setting: the submission's leaderboard run (for a grid, the selected point's)."""
    jobs = []
    for seeded in seed_runs(sub):
        base = _submission_base(seeded, suite, on, file, limit)
        jobs += [(s, Job(key=content_hash({**base, "setting": s.key()}), kind="submission", suite=suite.name,
                         setting=s.name, label=sub.name, seen=s.seen, unseen=s.unseen, fingerprint=on.fingerprint,
                         inputs=on.inputs, submission=seeded.model_dump(mode="json"), limit=limit))
                 for s in settings(suite)]
    return jobs


def seed_runs(sub: SubmissionSpec) -> list[SubmissionSpec]:
    """The submission once per seed it runs with, each a one-seed spec (a one-seed submission is itself)."""
    if not sub.seeds:
        return [sub]
    return [sub.model_copy(update={"seed": seed, "seeds": None}) for seed in sub.seeds]


def point_jobs(sub: SubmissionSpec, suite: SuiteSpec, on: SuiteInputs, setting: Setting, selected: Job,
               file: str | None = None) -> tuple[Job, ...]:
    """The grid points of one setting (and seed: the selected job's). A point's key leaves out the rest of
    the grid, so widening a grid reuses the points already stored."""
    sub = SubmissionSpec.model_validate(selected.submission)
    base = {**_submission_base(sub, suite, on, file, selected.limit), "grid": {}, "setting": setting.key(),
            "grid_point": True}
    return tuple(Job(key=content_hash({**base, "params": point}), kind="grid_point", suite=suite.name,
                     setting=setting.name, label=point_label(sub, point), seen=setting.seen, unseen=(),
                     fingerprint=on.fingerprint, inputs=on.inputs, submission=selected.submission, params=point,
                     limit=selected.limit)
                 for point in grid_points(sub))


def check_grid_data(sub: SubmissionSpec, suite: SuiteSpec, file: str | None = None) -> None:
    missing = [t.name for t in suite.tasks if t.validation_split is None]
    if sub.grid and missing:
        raise FbhError(f"a grid is selected on validation splits, but suite '{suite.name}' tasks {missing} "
                       "declare none", file=file, field="grid",
                       fix="submit fixed params, or declare validation splits")


def plan(sub: SubmissionSpec | None, suites: list[tuple[SuiteSpec, SuiteInputs]], done_keys: set[str], *,
         force: bool = False, file: str | None = None, limit: int | None = None) -> Plan:
    """What to run, what is stored, and which grid searches wait on their points. References
    are never forced: they depend on no submission. A stored selected run makes its grid
    points irrelevant, so an unchanged re-submit looks up one key per setting."""
    out = Plan([], [], [])
    for suite, on in suites:
        for job in reference_jobs(suite, on, limit):
            (out.cached if job.key in done_keys else out.todo).append(job)
        if sub is None:
            continue
        check_grid_data(sub, suite, file)
        for setting, job in submission_jobs(sub, suite, on, file, limit):
            if job.key in done_keys and not force:
                out.cached.append(job)
            elif not sub.grid:
                out.todo.append(job)
            else:
                points = point_jobs(sub, suite, on, setting, job, file)
                for p in points:
                    (out.cached if p.key in done_keys and not force else out.todo).append(p)
                out.searches.append(GridSearch(job, points))
    return out


def all_keys(p: Plan) -> list[str]:
    return [j.key for j in p.todo + p.cached] + [j.key for s in p.searches for j in (s.selected, *s.points)]
