"""fbh command line: a thin shell over harness.runner, harness.leaderboard and friends."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from harness.errors import FbhError

DB_HELP = "DuckDB results file [default: $FBH_DB, else .fbh/results.duckdb in the current directory]"


def _quiet_libraries() -> None:
    """Environment variables that transformers, huggingface_hub and datasets read when first
    imported: setting them costs nothing, where importing the libraries here to call their
    logging functions cost seconds on every command (an unchanged re-submit needs neither)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' own progress bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # imported before this command (in-process callers): too late for the env
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def progress_printer(quiet: bool = False):
    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)
    return say


class FbhGroup(click.Group):
    """Turns user errors into one clear message and exit code 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FbhError as exc:
            click.echo(f"error: {exc.render()}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # the cache's disk filled or turned read-only after the checks at the start
            from harness.paths import cache_error, in_cache
            if not in_cache(exc.filename):
                raise
            error = cache_error(exc)
            click.echo(f"error: {error.render()}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=FbhGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fbh")
def main():
    """fbh: fuse fine-tuned models, evaluate them on declared suites, and rank them."""
    _quiet_libraries()


@main.command()
@click.argument("submission_files", metavar="SUBMISSION...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--suite", "suites", multiple=True, help="suite name (repeatable) [default: the submission's "
              "suites, else every suite marked default]")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="recompute runs even if an identical run is stored")
@click.option("--quiet", is_flag=True, help="print only the summary")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON (progress still goes to stderr)")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="a smoke run: score the first N examples of each task only (stored as such; ranked only "
                   "with smoke runs of the same N, see `fbh leaderboard --limit N`)")
@click.option("--executor", type=click.Choice(["local", "ray", "slurm", "submitit-local"]), default="local",
              show_default=True, help="where jobs run; results always come back to this process's database")
@click.option("--address", default=None, help="Ray cluster address HOST:PORT (--executor ray)")
@click.option("--jobs-per-task", type=click.IntRange(1), default=1, show_default=True,
              help="jobs run in one Slurm / submitit task (amortizes model loading)")
@click.option("--submitit-folder", type=click.Path(path_type=Path), default=Path(".fbh/submitit"),
              show_default=True, help="where submitit keeps pickled jobs and logs (shared by the nodes)")
@click.option("--slurm-partition", default=None, help="Slurm partition")
@click.option("--gpus-per-task", type=click.IntRange(0), default=None, help="GPUs per Slurm task")
@click.option("--cpus-per-task", type=click.IntRange(1), default=None, help="CPUs per Slurm / submitit task")
@click.option("--timeout-min", type=click.IntRange(1), default=60, show_default=True,
              help="wall-time limit of a Slurm / submitit task, minutes")
def submit(submission_files, suites, db, device, force, quiet, as_json, limit, executor, address, jobs_per_task,
           submitit_folder, slurm_partition, gpus_per_task, cpus_per_task, timeout_min):
    """Fuse and evaluate each SUBMISSION (submissions/*.yaml files; shell globs work) and store the runs.
    Every file is validated before any is run; a failed run fails its own row, not the others."""
    import json
    from harness.validate import validate_file
    from harness.executors import make_executor
    from harness.runner import submit as run_submit
    if executor == "ray" and not address:
        raise FbhError("--executor ray needs the cluster's address", field="--address",
                       fix="start one with `ray start --head` and pass --address HOST:PORT")
    run_on = make_executor(executor, address=address, folder=submitit_folder, jobs_per_task=jobs_per_task,
                           slurm={"slurm_partition": slurm_partition, "gpus_per_node": gpus_per_task,
                                  "cpus_per_task": cpus_per_task, "timeout_min": timeout_min})
    for path in submission_files:  # a typo in the last file is found before the first one runs
        validate_file(path)
    reports = [run_submit(path, suites=list(suites) or None, db=db, device=device, progress=progress_printer(quiet),
                          force=force, executor=run_on, limit=limit) for path in submission_files]
    outcomes = [o for r in reports for o in r.outcomes]
    if as_json:
        click.echo(json.dumps({"outcomes": [{"submission": r.submission, **_outcome_json(o)}
                                            for r in reports for o in r.outcomes]}, indent=2))
    else:
        click.echo(summary_table(outcomes))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} run(s) failed", err=True)
        sys.exit(1)


def _outcome_json(o) -> dict:
    from dataclasses import asdict
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(o).items()}


def summary_table(outcomes) -> str:
    """One line a run: status, suite, setting, entry, mean clean score, fusion and evaluation seconds."""
    header = ("status", "suite", "setting", "entry", "score", "fusion s", "eval s")
    rows = [(o.status, o.suite, o.setting, o.label, _num(o.mean, 2), _num(o.fusion_seconds, 1),
             _num(o.eval_seconds, 1)) for o in outcomes]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    errors = [f"  {o.label} ({o.suite}/{o.setting}): {o.error}" for o in outcomes if o.error]
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), *errors])


def _num(v, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _open_results(db) -> "Store":  # noqa: F821
    from harness.paths import default_db
    from harness.store import Store
    path = db or default_db()
    if not Path(path).exists():
        raise FbhError("no results database yet", file=str(path), fix="run `fbh submit ...` first or pass --db")
    return Store(path)


def _format(fmt: str, as_json: bool) -> str:
    return "json" if as_json else fmt


@main.command()
@click.option("--suite", default=None, help="suite name [default: the database's only suite]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="same as --format json")
@click.option("--setting", default="all", show_default=True, help="'all' or a generalization split name")
@click.option("--condition", default="clean", show_default=True,
              help="'clean', a corruption name, or name@severity (jpeg@5) for one listed at several severities")
@click.option("--fingerprint", default=None, help="rank the runs on this fingerprint [default: what the suite's "
              "latest submit computed on]")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="show the smoke runs of `fbh submit --limit N` (never ranked with full runs)")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def leaderboard(suite, fmt, as_json, setting, condition, fingerprint, limit, db):
    """Print the leaderboard of one suite: references, then submissions by mean score, each average with
    its 95% bootstrap interval and each submission with its 95% range of ranks ('2-4': not separable
    from those ranks). Only runs computed on one fingerprint (the same models and data, byte for byte)
    are ranked together."""
    from harness.leaderboard import other_fingerprints, render, resolve_suite, suite_fingerprint, view
    fmt = _format(fmt, as_json)
    store = _open_results(db)
    suite = resolve_suite(store, suite)
    fingerprint = fingerprint or suite_fingerprint(store, suite)
    tasks, entries = view(store, suite, setting=setting, condition=condition, fingerprint=fingerprint, limit=limit)
    others = other_fingerprints(store, suite, fingerprint)
    if not entries:
        raise FbhError(f"no results for suite '{suite}' (setting {setting}, condition {condition}, fingerprint "
                       f"{fingerprint})", field="--suite",
                       fix="submit to this suite first, or check the name with `fbh suites list`"
                           + (f"; runs exist on fingerprints {', '.join(str(o['fingerprint']) for o in others)}"
                              if others else ""))
    about = {"suite": suite, "setting": setting, "condition": condition, "fingerprint": fingerprint,
             "example_limit": limit, "metrics": _metrics(store, suite, tasks), "other_fingerprints": others}
    click.echo(render(tasks, entries, fmt, about))
    if fmt == "table":
        click.echo(f"\nranked on fingerprint {fingerprint}; rank = 95% range of ranks over bootstrap resamples "
                   "of the test examples" + (f"; SMOKE RUNS on the first {limit} examples per task" if limit else ""))
        for o in others:
            where = o["fingerprint"] or "unknown (stored before runs recorded their inputs)"
            click.echo(f"  not ranked: {o['runs']} run(s) on fingerprint {where}"
                       + (f"; show them with --fingerprint {o['fingerprint']}" if o["fingerprint"] else ""))


def _metrics(store, suite: str, tasks: list[str]) -> dict[str, str]:
    from harness.leaderboard import task_metrics
    from harness.metrics import DEFAULT_METRIC
    primary = task_metrics(store, suite)
    return {t: primary.get(t, DEFAULT_METRIC) for t in tasks}


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--suite", default=None, help="suite name [default: the database's only suite]")
@click.option("--setting", default="all", show_default=True, help="'all' or a generalization split name")
@click.option("--condition", default="clean", show_default=True, help="'clean' or a corruption label")
@click.option("--fingerprint", default=None, help="[default: what the suite's latest submit computed on]")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="show the smoke runs of `fbh submit --limit N` (never ranked with full runs)")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def compare(a, b, suite, setting, condition, fingerprint, as_json, limit, db):
    """A minus B (two entries of one leaderboard) on every task and on the average, with a paired
    bootstrap over the same test examples: the 95% interval of the difference and its two-sided p-value."""
    import json
    from dataclasses import asdict
    from harness.leaderboard import compare as compare_entries, resolve_suite, suite_fingerprint
    store = _open_results(db)
    suite = resolve_suite(store, suite)
    fingerprint = fingerprint or suite_fingerprint(store, suite)
    ea, eb, rows = compare_entries(store, suite, a, b, setting=setting, condition=condition, fingerprint=fingerprint,
                                   limit=limit)
    if as_json:
        click.echo(json.dumps({"suite": suite, "setting": setting, "condition": condition, "fingerprint": fingerprint,
                               "a": a, "b": b, "rows": [asdict(r) for r in rows]}, indent=2))
        return
    click.echo(f"{a} minus {b} on {suite} ({setting}, {condition}); paired bootstrap over the same test examples")
    click.echo(f"{'task':16s} {'A':>7s} {'B':>7s} {'A-B':>7s} {'95% CI':>15s} {'p':>8s}")
    for r in rows:
        ci = f"{r.ci[0]:+.2f}..{r.ci[1]:+.2f}" if r.ci else "n/a"
        p = "n/a" if r.p_value is None else (f"<{r.p_value:.3f}" if r.p_value <= 1 / max(r.resamples, 1) else
                                             f"{r.p_value:.3f}")
        num = lambda v: "" if v is None else f"{v:7.2f}"  # noqa: E731
        click.echo(f"{r.what:16s} {num(r.a)} {num(r.b)} {'' if r.difference is None else f'{r.difference:+7.2f}'} "
                   f"{ci:>15s} {p:>8s}")


@main.command("export")
@click.argument("submission")
@click.option("--suite", default=None, help="suite name [default: the database's only suite]")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="a new or empty folder")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO",
              help="also upload the folder to this HuggingFace repo (needs a token and the network)")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def export_command(submission, suite, out, device, push_to_hub, db):
    """Save SUBMISSION's fused model (its stored run's method, hyperparameters and seed, fused again on the same
    inputs) with save_pretrained (safetensors) and a README.md model card: method, hyperparameters,
    fingerprint, inputs and scores."""
    from harness.export import export
    from harness.leaderboard import resolve_suite
    from harness.provenance import pick_device
    store = _open_results(db)
    done = export(store, submission, resolve_suite(store, suite), out, device=str(pick_device(device)),
                  progress=progress_printer(), push_to_hub=push_to_hub)
    click.echo(f"{done.out}: {', '.join(done.files)} (from run {done.run_id})")


@main.command()
@click.argument("target", required=False)
@click.option("--suite", default=None, help="only runs of this suite")
@click.option("--sample", type=click.IntRange(1), default=None,
              help="reproduce this many stored runs, drawn (seeded) from each suite's current fingerprint")
@click.option("--seed", type=int, default=0, show_default=True, help="the sample's seed")
@click.option("--tolerance", type=click.FloatRange(0), default=0.0, show_default=True,
              help="largest difference allowed per result row (same inputs, same code: 0 is expected)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def reproduce(target, suite, sample, seed, tolerance, device, db):
    """Run stored runs again from what they recorded and print the largest difference per result row.
    TARGET is a run id or a submission / reference name (all its settings); exit 1 over the tolerance."""
    from harness.paths import default_db
    from harness.provenance import pick_device
    from harness.reproduce import reproduce as run_again, runs_to_reproduce
    from harness.store import Store
    path = db or default_db()
    if not Path(path).exists():
        raise FbhError("no results database yet", file=str(path), fix="run `fbh submit ...` first or pass --db")
    if target is None and sample is None:
        raise FbhError("nothing to reproduce", field="TARGET", fix="give a run id or name, or --sample N")
    store = Store(path)
    worst = 0.0
    for run in runs_to_reproduce(store, target, suite, sample, seed):
        result = run_again(store, run, str(pick_device(device)), progress_printer(quiet=True))
        head = f"{run['suite']} / {run['setting']} / {run['label']} (run {run['run_id']})"
        if result.error:
            click.echo(f"FAILED  {head}: the run failed this time: {result.error}")
            worst = float("inf")
            continue
        worst = max(worst, result.largest)
        verdict = "same" if result.largest == 0 else ("within" if result.largest <= tolerance else "MOVED")
        click.echo(f"{verdict:7s} {head}: largest difference {result.largest:.6g} over {len(result.rows)} rows")
        for row in result.rows:
            if row.difference > 0:
                where = " ".join(str(x) for x in row.where if x is not None)
                click.echo(f"          {where}: stored {row.stored}, now {row.now}")
    if worst > tolerance:
        click.echo(f"a result moved by {worst:.6g}, over the tolerance {tolerance:g}", err=True)
        sys.exit(1)


@main.group()
def suites():
    """Inspect benchmark suites."""


@suites.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def suites_list(as_json):
    """List every suite in suites/ with its tasks and whether its models are available."""
    import json
    from harness.runner import find_suite, suite_files
    from harness.suites import availability
    listed = []
    for name in suite_files():
        try:
            spec, path = find_suite(name)
        except FbhError as exc:
            listed.append({"name": name, "status": "invalid", "why": exc.render().splitlines()[0]})
            continue
        status, why = availability(spec, path)
        listed.append({"name": name, "status": status, "why": why, "tasks": spec.task_names,
                       "family": spec.family.kind, "default": spec.default, "file": str(path)})
    if as_json:
        click.echo(json.dumps({"suites": listed}, indent=2))
        return
    for s in listed:
        if s["status"] == "invalid":
            click.echo(f"{s['name']:24s} INVALID  {s['why']}")
        else:
            click.echo(f"{s['name']:24s} {s['status']:11s} {len(s['tasks']):2d} tasks  {s['family']:14s} {s['why']}")


@suites.command("check")
@click.argument("name")
@click.option("--commands", "commands_only", is_flag=True,
              help="print only the `hf download` lines for what is missing (pipe them to sh)")
def suites_check(name, commands_only):
    """List every model and dataset suite NAME reads: id, revision, expected files, whether each is
    here (local path or HF cache, looked up offline) and how to fetch the rest. Exit 0 only when
    the suite can run."""
    from harness.runner import find_suite
    from harness.suites import check_suite
    spec, path = find_suite(name)
    check = check_suite(spec, path)
    if commands_only:
        for command in check.fetch_commands():
            click.echo(command)
        sys.exit(0 if check.runnable else 1)
    for i in check.inputs:
        state = "present" if i.present else ("incomplete" if i.location else "missing")
        revision = i.revision or "-"
        if i.revision and not i.pinned:
            revision += " (local cache, unpinned)"
        click.echo(f"{state:10s} {i.repo_type:7s} {i.ref}  [{i.field}]")
        click.echo(f"           revision {revision}; expects {', '.join('|'.join(g) for g in i.expected)}")
        if i.location:
            click.echo(f"           at {i.location}" + (f"; lacks {', '.join(i.missing)}" if i.missing else ""))
    if check.note:
        click.echo(f"note: {check.note}")
    if check.blocker:
        click.echo(f"blocked: {check.blocker}")
    commands = check.fetch_commands()
    local = [i for i in check.inputs if not i.present and not i.fetch]
    if commands:
        click.echo("\nto fetch what is missing:")
        click.echo("\n".join(f"  {c}" for c in commands))
    for i in local:
        click.echo(f"local path {i.ref} [{i.field}] is not there: create or convert it (README)")
    ready = sum(i.present for i in check.inputs)
    click.echo(f"\n{name}: {ready}/{len(check.inputs)} inputs present; "
               + ("can run" if check.runnable else "cannot run yet"))
    if not check.runnable:
        sys.exit(1)


@main.group()
def methods():
    """Inspect fusion methods."""


@methods.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON (every method's card)")
def methods_list(as_json):
    """List registered methods with their category, data access and output (read from the methods index
    while methods/ is unchanged, so it answers without importing torch)."""
    import json
    from harness.registry import method_cards
    cards, broken = method_cards()
    if as_json:
        click.echo(json.dumps({"methods": list(cards.values()), "failed_to_import": broken}, indent=2))
    for name, c in ({} if as_json else cards).items():
        params = ", ".join(f"{k}={p.get('default')!r}" for k, p in c["params"].get("properties", {}).items())
        click.echo(f"{name:24s} {c['category']:9s} data={c['data']:18s} output={c['output']:9s} {params}")
    for module, why in broken.items():
        click.echo(f"{module} failed to import: {why}", err=True)


@methods.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the method's card as JSON")
def methods_show(name, as_json):
    """Show method NAME: its docstring and citation, parameters (type, bounds, default, description),
    data access and output kind."""
    import json
    from harness.registry import method_cards
    cards, broken = method_cards()
    if name not in cards:
        close = [n for n in cards if n.startswith(name[:3])] or list(cards)
        raise FbhError(f"unknown method '{name}'" + "".join(f"; {m} failed to import" for m in broken),
                       field="NAME", fix=f"use one of: {', '.join(close[:12])} (see `fbh methods list`)")
    c = cards[name]
    if as_json:
        click.echo(json.dumps(c, indent=2))
        return
    click.echo(f"{c['name']}  ({c['category']}; data: {c['data']}; output: {c['output']}"
               + ("; trains" if c["trains"] else "") + ("; stochastic" if c["stochastic"] else "") + ")")
    click.echo(f"source: {c['source']}\n")
    click.echo(c["doc"] + "\n")
    props = c["params"].get("properties", {})
    click.echo("parameters:" if props else "parameters: none")
    for key, p in props.items():
        click.echo(f"  {key}: {_schema_type(p)}{_schema_bounds(p)} = {p.get('default')!r}"
                   + (f"  {p['description']}" if p.get("description") else ""))


def _schema_type(prop: dict) -> str:
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list[{_schema_type(prop.get('items', {}))}]"
    return prop.get("type", "any")


def _schema_bounds(prop: dict) -> str:
    marks = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    bounds = [f"{op} {prop[k]}" for k, op in marks.items() if k in prop]
    return f" ({', '.join(bounds)})" if bounds else ""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: each file's kind or error")
def validate(files, as_json):
    """Validate suite and submission files; exit 2 on the first problem in each."""
    import json
    from harness.validate import validate_file
    checked = []
    for f in files:
        try:
            checked.append({"file": str(f), "ok": True, "kind": validate_file(f)})
        except FbhError as exc:
            checked.append({"file": str(f), "ok": False, "error": exc.message, "in_file": exc.file, "field": exc.field,
                            "fix": exc.fix})
            if not as_json:
                click.echo(f"error: {exc.render()}", err=True)
            continue
        if not as_json:
            click.echo(f"ok      {f} ({checked[-1]['kind']})")
    if as_json:
        click.echo(json.dumps({"files": checked}, indent=2))
    if not all(c["ok"] for c in checked):
        sys.exit(2)


@main.command()
@click.option("--base", default=None, help="git ref the change is compared with, e.g. origin/main")
@click.option("--tier", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: suites whose zoo builds offline (tiny-vision); gpu: every available suite")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=Path(".fbh/ci-report.md"),
              show_default=True, help="where to write the Markdown report")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
@click.option("--quiet", is_flag=True, help="print only the report")
@click.option("--fuse-only", "fuse_only", is_flag=True,
              help="fuse what the change affects into --out (safetensors and a manifest); evaluate nothing")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="the folder --fuse-only writes")
@click.option("--evaluate", "evaluate_dir", type=click.Path(path_type=Path), default=None,
              help="evaluate the fused results a --fuse-only job wrote, with this checkout's harness")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON instead of the report (the "
              "Markdown report is still written to --report)")
def ci(base, tier, report_path, db, quiet, fuse_only, out, evaluate_dir, as_json):
    """Validate and evaluate the methods and submissions changed since BASE; exit 1 if any failed.

    In the PR workflow the two halves run apart: `--fuse-only --out DIR` (the PR's code, no results
    database) and `--evaluate DIR` (main's harness on those tensors)."""
    from harness.ci import evaluate_fused, fuse_changed, render, run_ci
    from harness.paths import default_db
    from harness.store import Store
    if evaluate_dir is None and base is None:
        raise FbhError("--base is required", field="--base", fix="pass the git ref to compare with, e.g. origin/main")
    if fuse_only:
        if out is None:
            raise FbhError("--fuse-only needs a folder to write", field="--out", fix="pass --out DIR")
        entries = fuse_changed(base, out, progress=progress_printer(quiet))
        failed = [e for e in entries if e.get("error")]
        for e in failed:
            click.echo(f"{e['path']}: {e['error']}", err=True)
        click.echo(f"fused {len(entries) - len(failed)} run(s) into {out} ({len(failed)} failed)")
        sys.exit(1 if failed else 0)
    path = db or default_db()
    if evaluate_dir is not None:
        result = evaluate_fused(evaluate_dir, db=path, progress=progress_printer(quiet))
    else:
        result = run_ci(base, tier=tier, db=path, progress=progress_printer(quiet))
    text = render(result, Store(path))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    click.echo(ci_json(result) if as_json else text)
    if result.failed:
        sys.exit(1)


def ci_json(result) -> str:
    """The CI result as JSON: what changed, each file check, each submission's runs (suite, setting, status,
    mean clean score) and whether it failed."""
    import json
    subs = [{"path": s.path, "name": s.name, "method": s.method, "reason": s.reason, "error": s.error,
             "failed": s.failed, "runs": [_outcome_json(o) for o in s.outcomes]} for s in result.submissions]
    return json.dumps({"base": result.base, "head": result.head, "tier": result.tier, "changed": result.changed,
                       "failed": result.failed, "notes": result.notes,
                       "file_checks": [{"file": f, "kind": k, "error": e} for f, k, e in result.file_checks],
                       "submissions": subs}, indent=2)


@main.group()
def zoo():
    """Build, export and import the models and data of embedded suites."""


def _zoo_suite(suite: str):
    from harness.runner import find_suite
    spec, path = find_suite(suite)
    if spec.family.zoo is None:
        raise FbhError(f"suite '{suite}' has no zoo: its models come from the hub", file=str(path),
                       field="family.zoo", fix="pick a suite with family.zoo, e.g. tiny-vision")
    return spec, path


@zoo.command("build")
@click.argument("suite")
@click.option("--force", is_flag=True, help="rebuild even if a finished build is cached")
def zoo_build(suite, force):
    """Build SUITE's zoo (models + data) into the cache, deterministically, on CPU; print its path
    (stdout) and its content digest (stderr), the value family.zoo.digest pins."""
    from harness.zoo import ensure_suite_zoo, zoo_digest
    spec, path = _zoo_suite(suite)
    say = progress_printer()
    out = ensure_suite_zoo(spec.family.zoo, path, progress=say, force=force)
    say(f"zoo digest {zoo_digest(out)}")
    click.echo(str(out))


@zoo.command("export")
@click.argument("suite")
@click.argument("dest", metavar="PATH", type=click.Path(path_type=Path))
def zoo_export(suite, dest):
    """Write SUITE's built zoo, its manifest and digest included, to PATH: a .tar.gz (.tgz, .tar),
    or a new folder when PATH has no tar suffix. `fbh zoo import PATH` installs it elsewhere."""
    from harness.zoo import is_built, zoo_digest, zoo_path
    from harness.zoo.share import export_zoo
    spec, path = _zoo_suite(suite)
    built = zoo_path(spec.family.zoo.builder, spec.family.zoo.recipe)
    if not is_built(built):
        raise FbhError(f"suite '{suite}' has no finished zoo build in this cache", file=str(path),
                       field="family.zoo", fix=f"build it first: `fbh zoo build {suite}`")
    export_zoo(built, dest)
    click.echo(f"{dest}  {built.name}  {zoo_digest(built)}")


@zoo.command("import")
@click.argument("src", metavar="PATH", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="replace a different build installed under the same key")
def zoo_import(src, force):
    """Verify every file of an export (a .tar.gz or folder from `fbh zoo export`) against its manifest
    and digest, then install it into the cache under its key; print the suites that use it."""
    from harness.runner import find_suite
    from harness.zoo import zoo_pin_mismatch
    from harness.zoo.share import import_zoo
    result = import_zoo(src, force=force)
    click.echo(f"{result.status}: {result.path}  {result.digest}")
    if not result.suites:
        click.echo("no suite here uses this key (its recipe or builder code differ from this checkout's)")
    for name in result.suites:
        spec, path = find_suite(name)
        click.echo(f"used by suite {name}")
        mismatch = zoo_pin_mismatch(spec.family.zoo, result.path, path)
        if mismatch:
            click.echo(mismatch, err=True)


@main.group()
def site():
    """Build and preview the static leaderboard site."""


@site.command("build")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=Path("_site"), show_default=True,
              help="directory to write the site into (files an earlier build wrote are replaced, others kept)")
def site_build(db, out):
    """Render every suite's leaderboard, robustness and generalization tables, plots and
    per-submission pages from the results database into a static site that works offline."""
    from harness.paths import default_db
    from harness.site import build
    from harness.store import Store
    path = db or default_db()
    if not Path(path).exists():
        raise FbhError("no results database yet", file=str(path), fix="run `fbh submit ...` first or pass --db")
    report = build(Store(path), out)
    click.echo(f"{report.pages} pages for {report.suites} suite(s) in {report.seconds:.1f} s: "
               f"{report.out / 'index.html'}")


@site.command("serve")
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=Path("_site"), show_default=True, help="a directory written by `fbh site build`")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
def site_serve(directory, port):
    """Preview the site at http://127.0.0.1:PORT/ (local only; Ctrl-C stops)."""
    from harness.site import serve
    serve(directory, port, announce=click.echo)


if __name__ == "__main__":
    main()
