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
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
def leaderboard(suite, fmt, setting, condition, db):
    """Print the leaderboard of one suite: references, then submissions by mean score."""
    from harness.leaderboard import render, table
    from harness.paths import default_db
    from harness.store import Store
    path = db or default_db()
    if not Path(path).exists():
        raise FbhError("no results database yet", file=str(path), fix="run `fbh submit ...` first or pass --db")
    tasks, entries = table(Store(path), suite, setting=setting, condition=condition)
    if not entries:
        raise FbhError(f"no results for suite '{suite}' (setting {setting}, condition {condition})",
                       field="--suite", fix="submit to this suite first, or check the name with `fbh suites list`")
    click.echo(render(tasks, entries, fmt))


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
@click.option("--base", required=True, help="git ref the change is compared with, e.g. origin/main")
@click.option("--tier", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: suites whose zoo builds offline (tiny-vision); gpu: every available suite")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=Path(".fbh/ci-report.md"),
              show_default=True, help="where to write the Markdown report")
@click.option("--db", type=click.Path(path_type=Path), default=None, help=DB_HELP)
@click.option("--quiet", is_flag=True, help="print only the report")
def ci(base, tier, report_path, db, quiet):
    """Validate and evaluate the methods and submissions changed since BASE; exit 1 if any failed."""
    from harness.ci import render, run_ci
    from harness.paths import default_db
    from harness.store import Store
    path = db or default_db()
    result = run_ci(base, tier=tier, db=path, progress=progress_printer(quiet))
    text = render(result, Store(path))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    click.echo(text)
    if result.failed:
        sys.exit(1)


@main.group()
def zoo():
    """Build the models and data of embedded suites."""


@zoo.command("build")
@click.argument("suite")
@click.option("--force", is_flag=True, help="rebuild even if a finished build is cached")
def zoo_build(suite, force):
    """Build SUITE's zoo (models + data) into the cache, deterministically, on CPU."""
    from harness.runner import find_suite
    from harness.zoo import ensure_built
    spec, path = find_suite(suite)
    if spec.family.zoo is None:
        raise FbhError(f"suite '{suite}' has no zoo: its models come from the hub", file=str(path),
                       field="family.zoo", fix="pick a suite with family.zoo, e.g. tiny-vision")
    out = ensure_built(spec.family.zoo.builder, spec.family.zoo.recipe, progress=progress_printer(), force=force)
    click.echo(str(out))


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
