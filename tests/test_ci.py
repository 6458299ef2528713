"""`fbh ci` on a temporary git repository: a commit adds a method and submissions, CI finds,
validates and runs them on the shrunken suite, writes the Markdown report and fails on the bad one.
Also checks the GitHub workflows parse and keep untrusted code away from secrets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.store import Store
from conftest import REPO

NEW_METHOD = '''\
"""Test-only method: the pre-trained model plus twice the mean task vector. arXiv:2212.04089"""

from harness.api import FusionContext, method
from harness.registry import NoParams
from harness.tensors import map_entries


@method("doubled_mean_task_vector", params=NoParams, category="merging")
def doubled_mean_task_vector(ctx: FusionContext, params: NoParams):
    experts = ctx.experts
    return map_entries(ctx.base, lambda k, b: b.float() + 2 * sum(e[k].float() - b.float() for e in experts)
                       / len(experts))
'''


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


@pytest.fixture()
def pr_repo(tmp_path):
    """A git repo holding this checkout's code (base commit) and a PR commit on top of it."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("harness", "methods", "submissions", "suites"):
        shutil.copytree(REPO / part, repo / part, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    (repo / "methods" / "doubled_mean_task_vector.py").write_text(NEW_METHOD)
    (repo / "submissions" / "doubled.yaml").write_text("name: doubled\nmethod: doubled_mean_task_vector\n")
    (repo / "submissions" / "doubled_bad.yaml").write_text(
        "name: doubled-bad\nmethod: doubled_mean_task_vector\nparams:\n  alpha: 1.0\n")
    avg = repo / "submissions" / "simple_average.yaml"
    avg.write_text(avg.read_text() + "authors: someone who edited the description\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "add a method and its submissions")
    return repo


def fbh_ci(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the clone's harness and methods, nothing else
    return subprocess.run([sys.executable, "-m", "harness.cli", "ci", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ci_finds_validates_runs_and_reports(fbh_env, pr_repo, tmp_path):
    db, report = tmp_path / "ci.duckdb", tmp_path / "report.md"
    proc = fbh_ci(pr_repo, "--base", "HEAD~1", "--db", str(db), "--report", str(report), "--quiet")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad submission fails CI
    text = report.read_text()
    assert text.startswith("# fbh CI: FAILED")
    assert "| `methods/doubled_mean_task_vector.py` | method | ok |" in text
    assert "| `submissions/doubled.yaml` | submission | ok |" in text
    bad = next(line for line in text.splitlines() if line.startswith("| `submissions/doubled_bad.yaml`"))
    assert "unknown hyperparameter" in bad and "params.alpha" in bad
    # The unchanged submission whose file changed runs too; other unchanged ones do not.
    assert "## simple-average" in text and "## task-arithmetic" not in text
    section = text.split("## doubled (method `doubled_mean_task_vector`)")[1].split("\n## ")[0]
    assert "### tiny-small" in section
    for row in ("| pretrained |", "| STL |", "| MTL |", "| **doubled** (this PR) |", "| leader: simple-average |"):
        assert row in section, section
    assert "| all | ok |" in section and "| two-seen | ok |" in section
    runs = Store(db).query("SELECT label, setting, status FROM runs WHERE kind = 'submission' ORDER BY ALL")
    assert [(r["label"], r["setting"], r["status"]) for r in runs] == [
        ("doubled", "all", "ok"), ("doubled", "two-seen", "ok"),
        ("simple-average", "all", "ok"), ("simple-average", "two-seen", "ok")]

    # Fixing the submission makes CI pass; results already stored are not recomputed.
    before = Store(db).query("SELECT run_id FROM runs WHERE label = 'doubled' ORDER BY run_id")
    (pr_repo / "submissions" / "doubled_bad.yaml").write_text(
        "name: doubled-bad\nmethod: doubled_mean_task_vector\nseed: 1\n")
    git(pr_repo, "commit", "-qam", "fix the submission")
    again = fbh_ci(pr_repo, "--base", "HEAD~2", "--db", str(db), "--report", str(report))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "# fbh CI: passed" in report.read_text()
    assert Store(db).query("SELECT run_id FROM runs WHERE label = 'doubled' ORDER BY run_id") == before
    assert Store(db).query("SELECT count(*) AS n FROM runs WHERE label = 'doubled-bad' AND status = 'ok'")[0]["n"] == 2

    nothing = fbh_ci(pr_repo, "--base", "HEAD", "--db", str(db), "--report", str(report), "--quiet")
    assert nothing.returncode == 0 and "Nothing changed since the base" in report.read_text()
    as_json = fbh_ci(pr_repo, "--base", "HEAD~2", "--db", str(db), "--report", str(report), "--quiet", "--json")
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and data["failed"] is False and "submissions/doubled_bad.yaml" in data["changed"]
    fixed = next(s for s in data["submissions"] if s["name"] == "doubled-bad")
    assert {(r["setting"], r["status"]) for r in fixed["runs"]} <= {("all", "cached"), ("two-seen", "cached"),
                                                                      ("all", "ok"), ("two-seen", "ok")}


def test_ci_unknown_base_is_a_clear_error(pr_repo):
    proc = fbh_ci(pr_repo, "--base", "no-such-ref")
    assert proc.returncode == 2 and "fetch" in proc.stderr and "--base" in proc.stderr


def test_workflows_parse_and_isolate_untrusted_code():
    pr = yaml.safe_load((REPO / ".github" / "workflows" / "pr.yml").read_text())
    triggers = pr[True] if True in pr else pr["on"]  # YAML 1.1 reads the key `on` as a boolean
    assert set(triggers) == {"pull_request"}  # never pull_request_target: forks' code must not see secrets
    assert not (triggers["pull_request"] or {}).get("paths")  # every PR runs the tests, whatever it touches
    assert pr["permissions"] == {"contents": "read"}
    text = (REPO / ".github" / "workflows" / "pr.yml").read_text()
    assert "${{ secrets" not in text
    jobs = pr["jobs"]
    runs = lambda job: " ".join(s.get("run", "") for s in jobs[job]["steps"])
    assert ".ci/run" in runs("tests")
    assert 'fbh ci --base "origin/$BASE_REF" --fuse-only --out fused' in runs("fuse")
    assert "fbh ci --evaluate fused" in runs("evaluate") and jobs["evaluate"]["needs"] == "fuse"
    # the evaluating job runs main's code on the fused tensors, never the PR's
    [checkout] = [s for s in jobs["evaluate"]["steps"] if s.get("uses", "").startswith("actions/checkout")]
    assert checkout["with"]["ref"] == "${{ github.event.pull_request.base.sha }}"
    assert 'fbh" ci --base "origin/$BASE_REF" --tier gpu' in runs("gpu-tier") and 'rm -rf "$JOB_DIR"' in runs("gpu-tier")
    pr_steps = [s for job in jobs.values() for s in job["steps"]]
    assert not [s["run"] for s in pr_steps if "${{" in s.get("run", "")]  # expressions reach scripts via env
    # PR code reads main's caches (results, exported zoo) but can never write one, nor a pip cache.
    assert not [s["uses"] for s in pr_steps if s.get("uses", "").startswith(("actions/cache@", "actions/cache/save"))]
    assert not [s for s in pr_steps if (s.get("with") or {}).get("cache")]
    assert any("fbh zoo import" in s.get("run", "") for s in pr_steps)
    site = yaml.safe_load((REPO / ".github" / "workflows" / "site.yml").read_text())
    triggers = site[True] if True in site else site["on"]
    assert triggers["push"]["branches"] == ["main"]
    steps = [s.get("uses", "") for job in site["jobs"].values() for s in job["steps"]]
    assert any(u.startswith("actions/deploy-pages") for u in steps)
    assert "fbh site build" in (REPO / ".github" / "workflows" / "site.yml").read_text()
    assert "fbh zoo export tiny-vision zoo-tiny-vision.tar.gz" in (REPO / ".github" / "workflows" / "site.yml").read_text()
    assert "fbh reproduce --sample" in (REPO / ".github" / "workflows" / "site.yml").read_text()


MODULE_METHOD = '''\
"""Test-only method that returns a module of its own (as mixing methods do). arXiv:2212.04089"""

from harness.api import FusionContext, method
from harness.registry import NoParams


@method("base_as_module", params=NoParams, category="mixing", output="larger")
def base_as_module(ctx: FusionContext, params: NoParams):
    return ctx.module(ctx.base)
'''


@pytest.mark.slow
def test_split_ci_fuses_with_the_prs_code_and_evaluates_with_the_trusted_harness(fbh_env, pr_repo, tmp_path):
    """`--fuse-only` (the PR's code) writes tensors and a manifest and stores nothing; `--evaluate`
    (this checkout's harness, outside the PR's tree) scores them exactly as plain `fbh ci` does, and
    refuses to load a result that is code, reporting it as data access not verified."""
    (pr_repo / "methods" / "base_as_module.py").write_text(MODULE_METHOD)
    (pr_repo / "submissions" / "base_module.yaml").write_text("name: base-module\nmethod: base_as_module\n")
    git(pr_repo, "add", "-A")
    git(pr_repo, "commit", "-qm", "a method whose result is a module")
    fused = tmp_path / "fused"
    proc = fbh_ci(pr_repo, "--base", "HEAD~2", "--fuse-only", "--out", str(fused), "--quiet")
    assert proc.returncode == 1, proc.stderr[-3000:]  # doubled-bad's unknown param
    assert "params.alpha" in proc.stderr and "Traceback" not in proc.stderr
    entries = json.loads((fused / "manifest.json").read_text())["entries"]
    doubled = [e for e in entries if e.get("name") == "doubled"]
    assert {e["job"]["setting"] for e in doubled} == {"all", "two-seen"}
    assert all((fused / e["dir"] / "fused.safetensors").is_file() and e["verified"] for e in doubled)
    assert not list(fused.rglob("*.duckdb"))

    trusted_db, report = tmp_path / "trusted.duckdb", tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "ci", "--evaluate", str(fused), "--db",
                           str(trusted_db), "--report", str(report), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    text = report.read_text()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # doubled-bad
    section = text.split("## doubled (method `doubled_mean_task_vector`)")[1].split("\n## ")[0]
    for row in ("| pretrained |", "| STL |", "| **doubled** (this PR) |", "| all | ok |", "| two-seen | ok |"):
        assert row in section, section
    assert text.count("base-module on tiny-small/all: data access not verified") == 1
    plain_db = tmp_path / "plain.duckdb"
    fbh_ci(pr_repo, "--base", "HEAD~2", "--db", str(plain_db), "--report", str(tmp_path / "plain.md"), "--quiet")
    query = ("SELECT setting, task, condition, metric, value FROM runs JOIN results USING (run_id) "
             "WHERE label = 'doubled' ORDER BY ALL")
    assert Store(trusted_db).query(query) == Store(plain_db).query(query) != []
    verified = Store(trusted_db).query("SELECT DISTINCT data_access_verified AS v FROM runs WHERE label = 'doubled'")
    assert verified == [{"v": True}]
    assert Store(plain_db).query("SELECT DISTINCT data_access_verified AS v FROM runs WHERE label = 'base-module'"
                                 ) == [{"v": False}]


def test_split_ci_bad_arguments_are_clear_errors(tmp_path):
    from click.testing import CliRunner
    from harness.cli import main
    for args, field in ((["ci"], "--base"), (["ci", "--base", "HEAD", "--fuse-only"], "--out"),
                        (["ci", "--evaluate", str(tmp_path / "nothing"), "--db", str(tmp_path / "x.duckdb")],
                         "--evaluate")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and field in res.output and "fix:" in res.output, res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "x.duckdb").exists()
