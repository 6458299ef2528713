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
