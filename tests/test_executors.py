"""Distributed executors, for real: a loopback Ray cluster (head + worker) and submitit's local
executor run the same batch of tiny-vision jobs as the local executor, and the driver stores
identical result rows from all three."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.planner import find_suite, plan
from harness.runner import local_executor, run_jobs
from harness.spec import load_submission
from harness.store import Store
from conftest import REPO

pytestmark = pytest.mark.slow

BATCH = ["task_arithmetic.yaml", "simple_average.yaml"]
ROWS = """SELECT r.kind, r.label, r.setting, r.status, x.task, x.task_split, x.condition, x.severity,
                 x.value, x.n, x.ci_low, x.ci_high
          FROM runs r JOIN results x USING (run_id) ORDER BY ALL"""


def batch_jobs() -> list:
    """References once, then two settings of each submission on the shrunken suite."""
    suite, _ = find_suite("tiny-small")
    jobs = {}
    for name in BATCH:
        todo, _ = plan(load_submission(REPO / "submissions" / name), [suite], set())
        jobs.update({j.key: j for j in todo})
    return list(jobs.values())


def run_batch_into(db: Path, executor, messages: list | None = None) -> list[tuple]:
    store = Store(db)
    jobs = batch_jobs()
    say = messages.append if messages is not None else (lambda m: None)
    outcomes = run_jobs(store, jobs, "cpu" if executor is local_executor else "auto", say, executor)
    assert len(outcomes) == len(jobs) == 7 and all(o.status == "ok" for o in outcomes), outcomes
    return [tuple(r.values()) for r in store.query(ROWS)]


@pytest.fixture(scope="module")
def local_rows(fbh_env):
    return run_batch_into(fbh_env / "exec-local.duckdb", local_executor)


# ----------------------------------------------------------------------------- submitit

def test_submitit_local_gives_the_local_rows(fbh_env, local_rows, tmp_path):
    pytest.importorskip("submitit")
    from harness.executors import make_executor
    executor = make_executor("submitit-local", folder=tmp_path / "submitit", jobs_per_task=4,
                             slurm={"timeout_min": 10, "cpus_per_task": 1})
    rows = run_batch_into(fbh_env / "exec-submitit.duckdb", executor)
    assert rows == local_rows
    # The work really ran in other processes: submitit left one log per task (7 jobs / 4 per task).
    assert len(list((tmp_path / "submitit").glob("*_log.out"))) == 2


def test_submit_cli_takes_an_executor(fbh_env, tmp_path):
    pytest.importorskip("submitit")
    from harness.cli import main
    db = tmp_path / "cli.duckdb"
    res = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / "simple_average.yaml"), "--db", str(db),
                                    "--executor", "submitit-local", "--jobs-per-task", "8",
                                    "--submitit-folder", str(tmp_path / "logs"), "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    statuses = sorted(line.split()[0] for line in res.output.splitlines() if line.strip())
    assert statuses == ["ok"] * 5
    assert {r["device"].split(":")[0] for r in Store(db).query("SELECT device FROM runs WHERE kind != 'published'")} \
        == {"cpu"}
    bad = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / "simple_average.yaml"), "--db", str(db),
                                    "--executor", "ray"])
    assert bad.exit_code == 2 and "--address" in bad.output


# ----------------------------------------------------------------------------- Ray

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(marker: str) -> set[int]:
    """Pids whose command line names our cluster's temp dir, plus all their descendants."""
    parents, found = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if marker in cmd:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


@pytest.fixture()
def loopback_ray_cluster(monkeypatch):
    """A head and a worker node on 127.0.0.1 only, each with one CPU; killed by pid afterwards."""
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="fbhray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray swaps 127.0.0.1 for the host's routable address unless told it is a single-host cluster.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
    try:
        subprocess.run([str(ray_cli), "start", "--head", f"--port={port}", "--include-dashboard=false",
                        "--ray-client-server-port", str(_free_port()), *common],
                       check=True, timeout=180, capture_output=True)
        subprocess.run([str(ray_cli), "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, timeout=180, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        pids = _processes_under(temp)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.5)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_gives_the_local_rows(fbh_env, local_rows, loopback_ray_cluster):
    import ray
    from harness.executors import make_executor
    messages = []
    rows = run_batch_into(fbh_env / "exec-ray.duckdb", make_executor("ray", address=loopback_ray_cluster), messages)
    assert rows == local_rows
    assert any("7 jobs on cpu" in m and "'CPU': 2.0" in m for m in messages), messages  # head + worker
    assert not ray.is_initialized()  # the executor disconnected the driver it connected
