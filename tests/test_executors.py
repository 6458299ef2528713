"""Distributed executors, for real: a loopback Ray cluster (head + worker) and submitit's local
executor run the same batch of tiny-vision jobs as the local executor, and the driver stores
identical result rows from all three; a grid submission runs one job per grid point on any
executor, then its selected point."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.leaderboard import table
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


def planned_suite(name: str):
    """(spec, inputs) as submit plans a suite: its zoo built and fingerprinted."""
    from harness.runner import suite_inputs
    spec, path = find_suite(name)
    return spec, suite_inputs(spec, path, lambda m: None)[1]


def batch_jobs() -> list:
    """References once, then two settings of each submission on the shrunken suite."""
    suite = planned_suite("tiny-small")
    jobs = {}
    for name in BATCH:
        jobs.update({j.key: j for j in plan(load_submission(REPO / "submissions" / name), [suite], set()).todo})
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
                                    "--submitit-folder", str(tmp_path / "logs"), "--quiet", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    statuses = sorted(o["status"] for o in json.loads(res.stdout)["outcomes"])
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


# ----------------------------------------------------------------------------- grid points

GRID = {"name": "ta-grid3", "method": "task_arithmetic", "grid": {"scaling_factor": [0.1, 0.5, 1.0]}}
GRID_ROWS = """SELECT r.kind, r.label, r.setting, r.status, r.params, r.grid, x.task, x.task_split, x.condition,
                      x.value, x.n, x.ci_low, x.ci_high
               FROM runs r JOIN results x USING (run_id) WHERE r.submission = 'ta-grid3' ORDER BY ALL"""


def counting(executor, ran: list):
    def execute(jobs, device, progress):
        ran.extend((j.kind, j.label, j.setting) for j in jobs)
        yield from executor(jobs, device, progress)
    execute.resolves_device = getattr(executor, "resolves_device", False)
    return execute


def test_grid_points_are_jobs_and_executors_agree(fbh_env, local_rows, write_yaml, tmp_path):
    pytest.importorskip("submitit")
    from harness.executors import make_executor
    from harness.runner import submit
    sub = write_yaml("grid3.yaml", GRID)
    planned = plan(load_submission(sub), [planned_suite("tiny-small")], set())
    points = [j for j in planned.todo if j.kind == "grid_point"]
    assert [(j.setting, j.params["scaling_factor"]) for j in points] == \
        [(s, f) for s in ("all", "two-seen") for f in (0.1, 0.5, 1.0)]
    assert len({j.key for j in points}) == 6 and len(planned.searches) == 2
    assert not any(j.kind == "submission" for j in planned.todo)  # the selected runs wait on their points

    rows = {}
    for name, executor in [("local", local_executor),
                           ("submitit-local", make_executor("submitit-local", folder=tmp_path / "logs",
                                                            jobs_per_task=8, slurm={"timeout_min": 10}))]:
        db = tmp_path / f"{name}.duckdb"
        shutil.copy(fbh_env / "exec-local.duckdb", db)  # references already stored
        ran = []
        report = submit(sub, db=db, device="cpu", progress=lambda _: None, executor=counting(executor, ran))
        assert not report.failed, report.failed
        assert sorted(ran) == sorted([("grid_point", f"ta-grid3@scaling_factor={f}", s)
                                      for s in ("all", "two-seen") for f in (0.1, 0.5, 1.0)]
                                     + [("submission", "ta-grid3", s) for s in ("all", "two-seen")])
        rows[name] = [tuple(r.values()) for r in Store(db).query(GRID_ROWS)]
        again = []
        report = submit(sub, db=db, device="cpu", progress=lambda _: None, executor=counting(executor, again))
        assert again == [] and {o.status for o in report.outcomes} == {"cached"}
    assert rows["submitit-local"] == rows["local"]

    store = Store(tmp_path / "local.duckdb")
    for setting, seen in [("all", 3), ("two-seen", 2)]:
        point_runs = store.query("SELECT * FROM runs WHERE kind = 'grid_point' AND setting = ?", [setting])
        scores = {json.loads(r["params"])["scaling_factor"]: r for r in point_runs}
        assert sorted(scores) == [0.1, 0.5, 1.0]
        for r in point_runs:  # a point is scored on validation of the seen tasks, never on test
            assert store.query("SELECT DISTINCT condition, task_split FROM results WHERE run_id = ?",
                               [r["run_id"]]) == [{"condition": "clean", "task_split": "seen"}]
            assert len(store.query("SELECT 1 FROM results WHERE run_id = ?", [r["run_id"]])) == seen
        chosen = store.query("SELECT * FROM runs WHERE kind = 'submission' AND label = 'ta-grid3' AND setting = ?",
                             [setting])
        assert len(chosen) == 1
        grid = json.loads(chosen[0]["grid"])
        assert [g["params"]["scaling_factor"] for g in grid] == [0.1, 0.5, 1.0]
        best = max(grid, key=lambda g: g["validation_mean"])
        assert json.loads(chosen[0]["params"]) == best["params"]
        assert chosen[0]["data_access"].endswith("+grid:labeled_validation")
    board = [e.label for e in table(store, "tiny-small")[1]]
    assert "ta-grid3" in board and not any("@" in label for label in board)


def test_grid_selection_reads_primary_metrics_with_their_direction():
    from harness.runner import point_scores
    # one score metric: the plain mean, highest wins
    means, scores = point_scores([{"a": 50.0, "b": 70.0}, {"a": 60.0, "b": 80.0}], {"a": "accuracy", "b": "accuracy"})
    assert means == [60.0, 70.0] and scores.index(max(scores)) == 1
    # one error metric: the lowest mean error wins
    means, scores = point_scores([{"d": 0.4}, {"d": 0.6}], {"d": "abs_err"})
    assert means == [0.4, 0.6] and scores.index(max(scores)) == 0
    # mixed metrics are never averaged: the point that ranks best over the tasks wins, even
    # though its raw values sum lower (an error of 0.5 beside mIoU 30 would swamp nothing)
    values = [{"seg": 30.0, "depth": 0.50, "normal": 20.0},
              {"seg": 31.0, "depth": 0.90, "normal": 30.0},
              {"seg": 29.0, "depth": 0.55, "normal": 21.0}]
    means, scores = point_scores(values, {"seg": "miou", "depth": "abs_err", "normal": "mean_angle"})
    assert means == [None] * 3
    assert scores.index(max(scores)) == 0
    # ties share their mean rank
    _, scores = point_scores([{"d": 1.0, "s": 5.0}, {"d": 1.0, "s": 5.0}], {"d": "abs_err", "s": "miou"})
    assert scores[0] == scores[1]
