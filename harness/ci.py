"""`fbh ci`: evaluate what a pull request adds or changes, and write a Markdown report.

The diff `git diff BASE...HEAD` of the checkout fbh runs from (harness.paths.REPO_ROOT,
whose methods/ is what the registry imports) decides what is affected:
  * a changed submissions/*.yaml is validated and run;
  * a changed methods/*.py is imported, and every submission using a method whose code it is
    runs: the method's own module, or a module of methods/ that one imports (methods/_common.py);
  * a change to a harness module that shapes results (harness.planner.RESULT_SHAPING_MODULES)
    re-keys every result, so every submission runs;
  * a changed suites/*.yaml is validated.
Tiers pick the suites: `cpu` runs every suite whose zoo fbh builds offline (tiny-vision),
`gpu` runs each submission's suites (else all) among those whose models are available.
The report compares each submission with the references and with the suite's best
other submission in the same database; the exit status is non-zero when anything failed.
"""

from __future__ import annotations

import importlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import FbhError
from harness.paths import REPO_ROOT

Progress = Callable[[str], None]
TIERS = ("cpu", "gpu")


@dataclass
class SubmissionResult:
    path: str
    name: str | None = None
    method: str | None = None
    reason: str = ""
    suites: list[str] = field(default_factory=list)
    outcomes: list = field(default_factory=list)     # runner.Outcome
    error: str | None = None                         # validation or planning error

    @property
    def failed(self) -> bool:
        return self.error is not None or any(o.status == "failed" for o in self.outcomes)


@dataclass
class CiResult:
    base: str
    head: str
    tier: str
    changed: list[str]
    file_checks: list[tuple[str, str, str | None]] = field(default_factory=list)  # (file, kind, error)
    submissions: list[SubmissionResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(err for _, _, err in self.file_checks) or any(s.failed for s in self.submissions)


# ----------------------------------------------------------------------------- git

def _git(*args: str, repo: Path = REPO_ROOT) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise FbhError(f"git {' '.join(args)} failed: {proc.stderr.strip()[:300]}", field="--base",
                       fix="run fbh ci from a git checkout, and fetch the base first "
                           "(e.g. `git fetch origin main`; actions/checkout needs fetch-depth: 0)")
    return proc.stdout


def changed_files(base: str, repo: Path = REPO_ROOT) -> list[str]:
    """Files added, copied, modified or renamed on HEAD since its merge base with `base`."""
    _git("rev-parse", "--verify", f"{base}^{{commit}}", repo=repo)
    out = _git("diff", "--name-only", "--diff-filter=ACMR", f"{base}...HEAD", repo=repo)
    return sorted(line for line in out.splitlines() if line.strip())


# ----------------------------------------------------------------------------- what is affected

def _rel(path: Path) -> str:
    return path.resolve().relative_to(REPO_ROOT).as_posix()


def _in_repo(path: Path) -> str | None:
    """The path relative to the checkout, or None for code outside it."""
    return _rel(path) if path.resolve().is_relative_to(REPO_ROOT) else None


def changed_methods(changed: set[str]) -> dict[str, list[str]]:
    """Method name -> the changed files among its code (its module and the methods/ modules it imports)."""
    from harness.registry import discover
    out = {}
    for name, info in discover().items():
        touched = sorted(rel for rel in map(_in_repo, info.code_files().values()) if rel in changed)
        if touched:
            out[name] = touched
    return out


def result_shaping_changed(changed: set[str]) -> bool:
    from harness.planner import HARNESS_DIR, RESULT_SHAPING_MODULES
    return any(_in_repo(HARNESS_DIR / rel) in changed for rel in RESULT_SHAPING_MODULES)


def check_method_files(changed: list[str]) -> list[tuple[str, str, str | None]]:
    """Import each changed method module, so a broken one fails CI with its own error."""
    checks = []
    for rel in changed:
        if rel.startswith("methods/") and rel.endswith(".py") and not Path(rel).name.startswith("_"):
            try:
                importlib.import_module(f"methods.{Path(rel).stem}")
                checks.append((rel, "method", None))
            except Exception as exc:
                checks.append((rel, "method", f"{type(exc).__name__}: {exc}"))
    return checks


def check_spec_files(files: list[Path]) -> list[tuple[str, str, str | None]]:
    from harness.validate import validate_file
    checks = []
    for path in files:
        try:
            checks.append((_rel(path), validate_file(path), None))
        except FbhError as exc:
            checks.append((_rel(path), "submission" if path.parent.name == "submissions" else "suite",
                           exc.render()))
    return checks


def affected_submissions(changed: list[str]) -> dict[Path, str]:
    """Submission file -> why it runs."""
    from harness.spec import load_submission
    changed_set = set(changed)
    methods_changed = changed_methods(changed_set)
    harness_changed = result_shaping_changed(changed_set)
    out: dict[Path, str] = {}
    for path in sorted((REPO_ROOT / "submissions").glob("*.y*ml")):
        if _rel(path) in changed_set:
            out[path] = "submission added or changed"
            continue
        try:
            method = load_submission(path).method
        except FbhError:
            continue  # an unchanged broken file is not this change's business
        if method in methods_changed:
            out[path] = f"method `{method}` changed ({', '.join(f'`{f}`' for f in methods_changed[method])})"
        elif harness_changed:
            out[path] = "harness code that shapes results changed"
    return out


def tier_suites(tier: str) -> list[str]:
    from harness.planner import find_suite, suite_files
    from harness.suites import availability
    names = []
    for name in suite_files():
        try:
            spec, path = find_suite(name)
        except FbhError:
            continue  # reported by validation when the change touches it
        builds_offline = spec.family.zoo is not None
        if builds_offline if tier == "cpu" else availability(spec, path)[0] == "available":
            names.append(name)
    return names


# ----------------------------------------------------------------------------- run

def changed_suites(changed: list[str]) -> list[Path]:
    """The suite files (suites/*.yaml) a change touches, itself or through a file it includes."""
    from harness.spec import included_files
    touched = {(REPO_ROOT / f).resolve() for f in changed}
    out = []
    for path in sorted((REPO_ROOT / "suites").glob("*.y*ml")):
        try:
            includes = set(included_files(path))
        except FbhError:
            includes = set()  # the broken suite is reported when it is validated itself
        if path.resolve() in touched or includes & touched:
            out.append(path)
    return out


def run_ci(base: str, *, tier: str = "cpu", db: Path, progress: Progress = print, executor=None) -> CiResult:
    from harness.registry import discover
    from harness.runner import local_executor, submit
    from harness.spec import load_submission
    from harness.validate import check_name_owned, validate_file
    if tier not in TIERS:
        raise FbhError(f"unknown tier '{tier}'", field="--tier", fix=f"use one of: {', '.join(TIERS)}")
    changed = changed_files(base)
    result = CiResult(base=base, head=_git("rev-parse", "--short", "HEAD").strip(), tier=tier, changed=changed)
    result.file_checks += check_method_files(changed)
    result.file_checks += check_spec_files(changed_suites(changed))
    suites = tier_suites(tier)
    used = set()
    for path, reason in affected_submissions(changed).items():
        sub_result = SubmissionResult(path=_rel(path), reason=reason)
        result.submissions.append(sub_result)
        try:
            sub = load_submission(path)
            sub_result.name, sub_result.method = sub.name, sub.method
            used.add(sub.method)
            validate_file(path)
            check_name_owned(sub.name, path, folder=REPO_ROOT / "submissions")
        except FbhError as exc:
            sub_result.error = exc.render()
        if sub_result.path in changed:
            result.file_checks.append((sub_result.path, "submission", sub_result.error))
        if sub_result.error:
            continue
        sub_result.suites = suites if tier == "cpu" or not sub.suites else [s for s in sub.suites if s in suites]
        if not sub_result.suites:
            result.notes.append(f"{sub.name}: no suite of the {tier} tier is runnable here")
            continue
        progress(f"ci: {sub.name} ({reason}) on {', '.join(sub_result.suites)}")
        try:
            sub_result.outcomes = submit(path, suites=sub_result.suites, db=db, progress=progress,
                                         device="cpu" if tier == "cpu" else "auto",
                                         executor=executor or local_executor).outcomes
        except FbhError as exc:
            sub_result.error = exc.render()
    # A method whose own module changed and that no submission runs; helpers' users are not listed.
    unused = sorted(name for name, info in discover().items()
                    if _in_repo(info.source_file) in changed and name not in used)
    result.notes += [f"method `{name}` changed but no submission uses it: add a submissions/*.yaml with "
                     f"`method: {name}` to evaluate it" for name in unused]
    return result


# ----------------------------------------------------------------------------- report

def _cell(v) -> str:
    return "" if v is None else f"{v:.1f}"


def suite_comparison(store, suite: str, submission: str) -> list[str]:
    """Markdown table: references, this submission, and the best other submission (clean, all tasks)."""
    from harness.leaderboard import other_fingerprints, suite_fingerprint, table
    fingerprint = suite_fingerprint(store, suite)
    tasks, entries = table(store, suite, fingerprint=fingerprint)
    mine = next((e for e in entries if e.kind == "submission" and e.label == submission), None)
    if mine is None:
        return ["_no stored result on this suite_"]
    if mine.status != "ok":
        return [f"_the latest run failed: {_one_line(mine.error or '')}_"]
    others = [e for e in entries if e.kind == "submission" and e.label != submission and e.status == "ok"]
    rows = [(e.label, e) for e in entries if e.kind == "reference"] + [(f"**{submission}** (this PR)", mine)]
    rows += [(f"leader: {others[0].label}", others[0])] if others else []
    lines = ["| | " + " | ".join(tasks) + " | average | normalized |", "|---" * (len(tasks) + 3) + "|"]
    lines += [f"| {label} | " + " | ".join(_cell(e.scores.get(t)) for t in tasks)
              + f" | {_cell(e.average)} | {_cell(e.normalized)} |" for label, e in rows]
    ranked = [e for e in entries if e.kind == "submission" and e.status == "ok"]
    lines.append("")
    lines.append(f"Rank {ranked.index(mine) + 1} of {len(ranked)} submissions in this database on fingerprint "
                 f"`{fingerprint}`" + ("" if others else " (no other submission stored to compare with)") + ".")
    elsewhere = other_fingerprints(store, suite, fingerprint)
    if elsewhere:
        lines.append(f"Not compared: {sum(o['runs'] for o in elsewhere)} stored run(s) on other fingerprints "
                     f"({', '.join(str(o['fingerprint']) for o in elsewhere)}), computed on other inputs.")
    return lines


def render(result: CiResult, store) -> str:
    verdict = "FAILED" if result.failed else "passed"
    out = [f"# fbh CI: {verdict}", "",
           f"Base `{result.base}`, head `{result.head}`, tier `{result.tier}`; "
           f"{len(result.changed)} changed file(s).", ""]
    if not result.changed:
        out += ["Nothing changed since the base: nothing to evaluate.", ""]
    if result.file_checks:
        out += ["## Validation", "", "| file | kind | result |", "|---|---|---|"]
        out += [f"| `{f}` | {kind} | {'ok' if err is None else 'error: ' + _one_line(err)} |"
                for f, kind, err in result.file_checks]
        out.append("")
    for sub in result.submissions:
        out += [f"## {sub.name or sub.path}" + (f" (method `{sub.method}`)" if sub.method else ""), "",
                f"`{sub.path}`: {sub.reason}.", ""]
        if sub.error:
            out += ["**Error:**", "", "```", sub.error, "```", ""]
            continue
        for suite in sub.suites:
            out += [f"### {suite}", "", *suite_comparison(store, suite, sub.name), ""]
            runs = [o for o in sub.outcomes if o.suite == suite and o.label == sub.name]
            out += ["| setting | status | mean clean accuracy (seen tasks) | error |", "|---|---|---|---|"]
            out += [f"| {o.setting} | {o.status} | {_cell(o.mean)} | {_one_line(o.error or '')} |" for o in runs]
            out.append("")
    if result.notes:
        out += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    return "\n".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:500]


# ----------------------------------------------------------------------------- the split workflow
# The PR's code fuses in one job (`fbh ci --fuse-only --out DIR`) and uploads DIR; main's harness,
# in a second job, evaluates the tensors in DIR (`fbh ci --evaluate DIR`). A result that is code
# (a pickled module) is not loaded by the trusted job: it is reported as data access not verified.

MANIFEST = "manifest.json"


def fuse_changed(base: str, out: Path, progress: Progress = print) -> list[dict]:
    """Fuse every planned run of the submissions the change affects, on the cpu tier's suites, and
    write each fused result under out/<run key>/ with out/manifest.json; nothing is evaluated."""
    import json
    out.mkdir(parents=True, exist_ok=True)
    suites = tier_suites("cpu")
    changed = changed_files(base)
    entries = []
    for path, reason in affected_submissions(changed).items():
        entries += fuse_submission(path, reason, suites, out, progress)
    head = _git("rev-parse", "--short", "HEAD").strip()
    (out / MANIFEST).write_text(json.dumps({"base": base, "head": head, "changed": changed, "entries": entries},
                                           indent=1))
    return entries


def fuse_submission(path: Path, reason: str, suites: list[str], out: Path, progress: Progress) -> list[dict]:
    from harness.isolation import isolated_fuse
    from harness.planner import find_suite, plan
    from harness.runner import open_suite, suite_inputs
    from harness.validate import validate_submission
    from harness.spec import load_submission
    entry = {"path": _rel(path), "reason": reason}
    try:
        sub = load_submission(path)
        info = validate_submission(sub, str(path))
        entry.update(name=sub.name, method=sub.method)
        if sub.grid:
            raise FbhError("a grid submission selects its point on validation scores, which the fusion job does "
                           "not compute", file=str(path), field="grid",
                           fix="run it with plain `fbh ci`, or submit the selected params without a grid")
        specs = [find_suite(s) for s in suites]
        jobs = [j for j in plan(sub, [(s, suite_inputs(s, f, progress)[1]) for s, f in specs], set(), force=True,
                                file=str(path)).todo if j.kind == "submission"]  # references: the trusted job's
    except FbhError as exc:
        return [{**entry, "error": exc.render()}]
    entries = []
    for job in jobs:
        handle = open_suite(job.suite, "cpu", progress)
        params = info.validate_params(job.params if job.params is not None else sub.params)
        progress(f"ci: fusing {sub.name} on {job.suite}/{job.setting}")
        item = {**entry, "job": job.as_dict(), "dir": job.key, "data_access": info.data_used(params),
                "params": params.model_dump(mode="json")}
        try:
            fused = isolated_fuse(handle, list(job.seen), info, params, sub.seed, "cpu",
                                  budget=handle.spec.fusion_budget_seconds, progress=progress, keep=out / job.key)
            item.update(fusion_seconds=fused.seconds, peak_memory_bytes=fused.peak_memory_bytes,
                        verified=fused.verified)
        except Exception as exc:  # the method's failure is its entry's
            item["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        entries.append(item)
    return entries


def evaluate_fused(folder: Path, *, db: Path, progress: Progress = print) -> CiResult:
    """Evaluate what `--fuse-only` wrote, with this checkout's harness and suites: no code of the
    PR's is imported or unpickled. Each run goes into db and the report compares it as `run_ci` does."""
    import json
    from harness.isolation import UNVERIFIED
    from harness.planner import Job
    from harness.runner import Outcome, mean_clean
    from harness.store import Store
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FbhError(f"cannot read the fusion job's manifest: {exc}", file=str(folder / MANIFEST),
                       field="--evaluate", fix="pass the folder `fbh ci --fuse-only --out DIR` wrote") from None
    result = CiResult(base=manifest.get("base", "?"), head=manifest.get("head", "?"), tier="cpu",
                      changed=manifest.get("changed", []))
    store = Store(db)
    stored_suites: set[str] = set()
    by_path: dict[str, SubmissionResult] = {}
    for entry in manifest["entries"]:
        sub = by_path.setdefault(entry["path"], SubmissionResult(path=entry["path"], name=entry.get("name"),
                                                                 method=entry.get("method"), reason=entry["reason"]))
        if "job" not in entry:
            sub.error = entry.get("error")
            continue
        try:  # the manifest was written by the PR's code: anything in it may be malformed
            job = Job(**{**entry["job"], "seen": tuple(entry["job"]["seen"]), "unseen": tuple(entry["job"]["unseen"])})
            if Path(entry["dir"]).name != entry["dir"] or entry["dir"] in ("", ".", ".."):
                raise ValueError(f"'{entry['dir']}' is not a folder name")
        except (KeyError, TypeError, ValueError) as exc:
            sub.error = f"malformed manifest entry: {type(exc).__name__}: {exc}"
            continue
        if entry.get("verified") is False:  # never loaded here: the PR job's plain `fbh ci` report has its scores
            result.notes.append(f"{sub.name} on {job.suite}/{job.setting}: {UNVERIFIED}")
            continue
        if job.suite not in sub.suites:
            sub.suites.append(job.suite)
        if job.suite not in stored_suites:  # the fingerprint the report ranks on, and the references
            stored_suites.add(job.suite)
            store_suite_and_references(store, job.suite, progress)
        run, rows = evaluate_entry(job, entry, folder / entry["dir"], progress)
        store.write_run(run, rows)
        sub.outcomes.append(Outcome(run.suite, run.setting, run.label, run.status, run.run_id, run.error,
                                    mean_clean(rows)))
    result.submissions = list(by_path.values())
    return result


def store_suite_and_references(store, suite: str, progress: Progress) -> None:
    """The suite's row, published rows and computed references, as a submit stores them (a database
    restored from main's site job has them already: then nothing is recomputed)."""
    from harness.planner import find_suite, plan
    from harness.runner import run_jobs, store_published, store_suite, suite_inputs
    spec, file = find_suite(suite)
    on = suite_inputs(spec, file, progress)[1]
    store_suite(store, spec, on, progress)
    store_published(store, spec, file)
    references = plan(None, [(spec, on)], set()).todo
    done = store.completed_keys([j.key for j in references])
    run_jobs(store, [j for j in references if j.key not in done], "cpu", progress)


def evaluate_entry(job, entry: dict, out: Path, progress: Progress):
    """One fused result as a run: the trusted harness builds and evaluates it (a result that is code
    is refused, see harness.isolation.read_result); the method's own failure is the run's."""
    import torch
    from harness.errors import MethodFailed
    from harness.evaluate import as_predictor
    from harness.isolation import read_result
    from harness.runner import _provenance, open_suite, submission_scorer
    from harness.store import Run, now
    handle = open_suite(job.suite, "cpu", progress)
    run = Run(run_key=job.key, kind=job.kind, label=job.label, submission=entry.get("name"), suite=job.suite,
              setting=job.setting, method=entry.get("method"), data_access=entry.get("data_access"),
              params=entry.get("params"), output_kind="fused in the PR's job", started_at=now(),
              **_provenance(torch.device("cpu"), (job.submission or {}).get("seed"), job))
    try:
        if entry.get("error"):
            raise MethodFailed(entry["error"])
        handle.check(job, progress)  # fused on the inputs this suite has here, or not compared
        fused = read_result(out, handle, list(job.seen), entry["fusion_seconds"], progress, load_code=False)
        predictor = as_predictor(fused.value, handle.family)
        run.fusion_seconds, run.peak_memory_bytes = fused.seconds, fused.peak_memory_bytes
        run.data_access_verified, run.n_parameters = True, predictor.num_parameters()
        rows = [r.as_dict() for r in submission_scorer(job, handle)(predictor)]
    except Exception as exc:
        run.status, run.error = "failed", (str(exc) if isinstance(exc, MethodFailed) else
                                           f"{type(exc).__name__}: {exc}")[:2000]
        rows = []
    run.finished_at = now()
    return run, rows
