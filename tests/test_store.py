"""The DuckDB store: runs are complete or absent, keyed, and replaceable."""

import duckdb
import pytest

from harness.store import Run, Store

ROW = {"task": "a", "task_split": "seen", "condition": "clean", "severity": None, "metric": "accuracy",
       "value": 50.0, "n": 10, "ci_low": 40.0, "ci_high": 60.0}


def test_write_and_read_run(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    run = Run(run_key="k1", kind="submission", label="x", suite="s", params={"a": 1})
    store.write_run(run, [ROW, {**ROW, "task": "b", "value": 70.0}])
    done = store.completed_run("k1")
    assert done["run_id"] == run.run_id
    assert store.counts()["results"] == 2
    assert store.query("SELECT params FROM runs")[0]["params"] == '{"a": 1}'


def test_failed_write_leaves_nothing(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    bad = {**ROW, "value": None}  # NOT NULL violation after the run row was inserted
    with pytest.raises(duckdb.Error):
        store.write_run(Run(run_key="k", kind="submission", label="x", suite="s"), [ROW, bad])
    assert store.counts()["runs"] == 0 and store.counts()["results"] == 0


def test_same_key_replaces_previous_run(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    store.write_run(Run(run_key="k", kind="submission", label="x", suite="s", status="failed", error="boom"), [])
    assert store.completed_run("k") is None
    store.write_run(Run(run_key="k", kind="submission", label="x", suite="s"), [ROW])
    assert store.counts()["runs"] == 1 and store.completed_run("k") is not None
