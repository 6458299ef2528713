"""Distributed executors, for real: a loopback Ray cluster (head + worker) and submitit's local
executor run the same batch of tiny-vision jobs as the local executor, and the driver stores
identical result rows from all three."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def test_submit_cli_takes_an_executor(fbh_env, local_rows, tmp_path):
    pytest.importorskip("submitit")
    from harness.cli import main
    db = tmp_path / "cli.duckdb"
    shutil.copy(fbh_env / "exec-local.duckdb", db)  # references stored; --force reruns only the submission
    res = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / "simple_average.yaml"), "--db", str(db),
                                    "--force", "--executor", "submitit-local", "--jobs-per-task", "8",
                                    "--submitit-folder", str(tmp_path / "logs"), "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    statuses = sorted(line.split()[0] for line in res.output.splitlines() if line.strip())
    assert statuses == ["cached"] * 3 + ["ok"] * 2
    assert len(list((tmp_path / "logs").glob("*_log.out"))) == 1
    assert {r["device"].split(":")[0] for r in Store(db).query("SELECT device FROM runs WHERE kind != 'published'")} \
        == {"cpu"}
    bad = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / "simple_average.yaml"), "--db", str(db),
                                    "--executor", "ray"])
    assert bad.exit_code == 2 and "--address" in bad.output


# ----------------------------------------------------------------------------- Ray

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
    """A head and a worker node (one CPU each) bound to 127.0.0.1, shut down afterwards.

    Ray's own multi-node test cluster (ray.cluster_utils.Cluster): `ray start` refuses a
    second node on a loopback-only host, and otherwise binds the host's routable address.
    """
    temp = tempfile.mkdtemp(prefix="fbhray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray rewrites 127.0.0.1 to the host's routable address unless it believes it is a
    # single-host cluster; the flag is read when Ray is imported, so set both.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_TMPDIR", temp)  # where Ray writes the current cluster's address
    (Path(temp) / "ray").mkdir()
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "temp_dir": temp}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False},
                          shutdown_at_exit=False)
        cluster.add_node(**node)
        yield cluster.address
    finally:
        if cluster is not None:
            cluster.shutdown()
        _kill(_processes_under(temp))  # anything the shutdown left behind, by pid
        shutil.rmtree(temp, ignore_errors=True)


def _kill(pids: set[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.5)


def test_ray_cluster_gives_the_local_rows(fbh_env, local_rows, loopback_ray_cluster):
    import ray
    from harness.executors import make_executor
    messages = []
    rows = run_batch_into(fbh_env / "exec-ray.duckdb", make_executor("ray", address=loopback_ray_cluster), messages)
    assert rows == local_rows
    assert any("7 jobs on cpu" in m and "'CPU': 2.0" in m for m in messages), messages  # head + worker
    assert not ray.is_initialized()  # the executor disconnected the driver it connected
