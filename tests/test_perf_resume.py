"""Resume: an unchanged re-submit recomputes nothing; an interrupted batch runs only the missing jobs."""

from __future__ import annotations

import pytest

from conftest import REPO
from harness import runner
from harness.store import Store

pytestmark = pytest.mark.slow


def counting_executor(ran: list):
    def execute(jobs, device, progress):
        for job in jobs:
            ran.append((job.kind, job.label, job.setting))
            yield runner.execute_job(job, device, progress)
    return execute


def test_resubmit_is_cached_and_an_interrupted_batch_runs_only_missing_jobs(fbh_env):
    db = fbh_env / "resume.duckdb"
    sub = REPO / "submissions" / "simple_average.yaml"
    quiet = lambda _: None  # noqa: E731
    first: list = []
    report = runner.submit(sub, db=db, device="cpu", progress=quiet, executor=counting_executor(first))
    assert not report.failed
    assert ("submission", "simple-average", "all") in first and len(first) == len(report.outcomes)

    again: list = []
    report = runner.submit(sub, db=db, device="cpu", progress=quiet, executor=counting_executor(again))
    assert again == [] and {o.status for o in report.outcomes} == {"cached"}

    # An interrupted batch: the 'all' run of the submission never got stored.
    store = Store(db)
    run_id = store.query("SELECT run_id FROM runs WHERE label = 'simple-average' AND setting = 'all'")[0]["run_id"]
    with store.transaction() as con:
        con.execute("DELETE FROM results WHERE run_id = ?", [run_id])
        con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
    resumed: list = []
    report = runner.submit(sub, db=db, device="cpu", progress=quiet, executor=counting_executor(resumed))
    assert resumed == [("submission", "simple-average", "all")]
    assert sorted(o.status for o in report.outcomes).count("cached") == len(report.outcomes) - 1
    assert len(Store(db).query("SELECT * FROM runs WHERE label = 'simple-average' AND setting = 'all'")) == 1


class Killed(BaseException):
    """Stands for the driver being killed: not an Exception, so nothing catches it."""


def test_a_grid_interrupted_after_some_points_reruns_only_the_missing_points(fbh_env, write_yaml):
    db = fbh_env / "grid-resume.duckdb"
    sub = write_yaml("grid.yaml", {"name": "resume-grid", "method": "task_arithmetic",
                                   "grid": {"scaling_factor": [0.2, 0.4, 0.6]}})
    quiet = lambda _: None  # noqa: E731
    first: list = []

    def dies_after_two_points(jobs, device, progress):
        for result in counting_executor(first)(jobs, device, progress):
            yield result
            if sum(kind == "grid_point" for kind, _, _ in first) == 2:
                raise Killed

    with pytest.raises(Killed):
        runner.submit(sub, db=db, device="cpu", progress=quiet, executor=dies_after_two_points)
    stored = {(r["label"], r["setting"]) for r in Store(db).query("SELECT * FROM runs WHERE kind = 'grid_point'")}
    assert len(stored) == 2
    resumed: list = []
    report = runner.submit(sub, db=db, device="cpu", progress=quiet, executor=counting_executor(resumed))
    assert not report.failed
    points = {(f"resume-grid@scaling_factor={f}", s) for f in (0.2, 0.4, 0.6) for s in ("all", "two-seen")}
    assert {(label, s) for kind, label, s in resumed if kind == "grid_point"} == points - stored
    assert ("submission", "resume-grid", "all") in resumed and ("submission", "resume-grid", "two-seen") in resumed
    assert len(Store(db).query("SELECT * FROM runs WHERE kind = 'grid_point'")) == 6
