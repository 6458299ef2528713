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


@click.group(cls=FbhGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fbh")
def main():
    """fbh: fuse fine-tuned models, evaluate them on declared suites, and rank them."""
    _quiet_libraries()


@main.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--suite", "suites", multiple=True, help="suite name (repeatable) [default: the submission's "
              "suites, else every suite marked default]")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="recompute runs even if an identical run is stored")
@click.option("--quiet", is_flag=True, help="print only the summary")
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
def submit(submission, suites, db, device, force, quiet, executor, address, jobs_per_task, submitit_folder,
           slurm_partition, gpus_per_task, cpus_per_task, timeout_min):
    """Fuse and evaluate SUBMISSION (a submissions/*.yaml file) and store the runs."""
    from harness.executors import make_executor
    from harness.runner import submit as run_submit
    if executor == "ray" and not address:
        raise FbhError("--executor ray needs the cluster's address", field="--address",
                       fix="start one with `ray start --head` and pass --address HOST:PORT")
    run_on = make_executor(executor, address=address, folder=submitit_folder, jobs_per_task=jobs_per_task,
                           slurm={"slurm_partition": slurm_partition, "gpus_per_node": gpus_per_task,
                                  "cpus_per_task": cpus_per_task, "timeout_min": timeout_min})
    report = run_submit(submission, suites=list(suites) or None, db=db, device=device,
                        progress=progress_printer(quiet), force=force, executor=run_on)
    for o in report.outcomes:
        score = f"{o.mean:6.2f}" if o.mean is not None else "      "
        click.echo(f"{o.status:7s} {o.suite:18s} {o.setting:24s} {o.label:28s} {score}"
                   + (f"  {o.error}" if o.error else ""))
    if report.failed:
        click.echo(f"{len(report.failed)} run(s) failed", err=True)
        sys.exit(1)


@main.command()
@click.option("--suite", required=True, help="suite name")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--setting", default="all", show_default=True, help="'all' or a generalization split name")
@click.option("--condition", default="clean", show_default=True,
              help="'clean', a corruption name, or name@severity (jpeg@5) for one listed at several severities")
@click.option("--fingerprint", default=None, help="rank the runs on this fingerprint [default: what the suite's "
              "latest submit computed on]")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def leaderboard(suite, fmt, setting, condition, fingerprint, db):
    """Print the leaderboard of one suite: references, then submissions by mean score. Only runs computed
    on one fingerprint (the same models and data, byte for byte) are ranked together."""
    from harness.leaderboard import other_fingerprints, render, suite_fingerprint, table
    from harness.paths import default_db
    from harness.store import Store
    path = db or default_db()
    if not Path(path).exists():
        raise FbhError("no results database yet", file=str(path), fix="run `fbh submit ...` first or pass --db")
    store = Store(path)
    fingerprint = fingerprint or suite_fingerprint(store, suite)
    tasks, entries = table(store, suite, setting=setting, condition=condition, fingerprint=fingerprint)
    others = other_fingerprints(store, suite, fingerprint)
    if not entries:
        raise FbhError(f"no results for suite '{suite}' (setting {setting}, condition {condition}, fingerprint "
                       f"{fingerprint})", field="--suite",
                       fix="submit to this suite first, or check the name with `fbh suites list`"
                           + (f"; runs exist on fingerprints {', '.join(str(o['fingerprint']) for o in others)}"
                              if others else ""))
    about = {"suite": suite, "setting": setting, "condition": condition, "fingerprint": fingerprint,
             "other_fingerprints": others}
    click.echo(render(tasks, entries, fmt, about))
    if fmt == "table":
        click.echo(f"\nranked on fingerprint {fingerprint}")
        for o in others:
            where = o["fingerprint"] or "unknown (stored before runs recorded their inputs)"
            click.echo(f"  not ranked: {o['runs']} run(s) on fingerprint {where}"
                       + (f"; show them with --fingerprint {o['fingerprint']}" if o["fingerprint"] else ""))


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
def suites_list():
    """List every suite in suites/ with its tasks and whether its models are available."""
    from harness.runner import find_suite, suite_files
    from harness.suites import availability
    for name in suite_files():
        try:
            spec, path = find_suite(name)
        except FbhError as exc:
            click.echo(f"{name:24s} INVALID  {exc.render().splitlines()[0]}")
            continue
        status, why = availability(spec, path)
        click.echo(f"{name:24s} {status:11s} {len(spec.tasks):2d} tasks  {spec.family.kind:14s} {why}")


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
def methods_list():
    """List registered methods with their category, data access and output."""
    from harness.registry import discover, import_failures
    for name, info in discover().items():
        params = ", ".join(f"{k}={f.default!r}" for k, f in info.params.model_fields.items())
        click.echo(f"{name:24s} {info.category:9s} data={info.data:18s} output={info.output:9s} {params}")
    for module, why in import_failures().items():
        click.echo(f"{module} failed to import: {why}", err=True)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files):
    """Validate suite and submission files; exit 2 on the first problem in each."""
    from harness.validate import validate_file
    bad = 0
    for f in files:
        try:
            kind = validate_file(f)
            click.echo(f"ok      {f} ({kind})")
        except FbhError as exc:
            bad += 1
            click.echo(f"error: {exc.render()}", err=True)
    if bad:
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
def ci(base, tier, report_path, db, quiet, fuse_only, out, evaluate_dir):
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
    click.echo(text)
    if result.failed:
        sys.exit(1)


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
    from harness.zoo import export_zoo, is_built, zoo_digest, zoo_path
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
    from harness.zoo import import_zoo, zoo_pin_mismatch
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
              help="directory to write the site into (replaced if it holds an earlier build)")
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
