"""Killing `fbh submit` at random points loses nothing that was stored and leaves no half
run; two submits on one database at once lose and duplicate nothing."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from harness.store import Store
from conftest import REPO, SMALL_TASKS

pytestmark = pytest.mark.slow

# Rows a complete run must have on the shrunken suite (3 tasks; 2 corruptions in 'all').
ROWS_ALL = len(SMALL_TASKS) * 3
EXPECTED_ROWS = {("reference", "all"): ROWS_ALL, ("submission", "all"): ROWS_ALL,
                 ("submission", "two-seen"): len(SMALL_TASKS), ("published", "all"): len(SMALL_TASKS)}


def fbh_process(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_consistent(db) -> dict:
    """Every stored run is complete: ok with all its rows, or failed with none. Returns key -> label."""
    store = Store(db)
    runs = store.query("SELECT r.run_key, r.kind, r.label, r.setting, r.status, count(x.run_id) AS n "
                       "FROM runs r LEFT JOIN results x USING (run_id) GROUP BY ALL")
    keys = [r["run_key"] for r in runs]
    assert len(keys) == len(set(keys)), "a run key is stored twice"
    for r in runs:
        assert r["status"] == "ok", r
        assert r["n"] == EXPECTED_ROWS[(r["kind"], r["setting"])], r
    orphans = store.query("SELECT count(*) AS n FROM results WHERE run_id NOT IN (SELECT run_id FROM runs)")
    assert orphans[0]["n"] == 0
    return {r["run_key"]: (r["label"], r["setting"]) for r in runs}


def test_sigkill_at_random_points_then_resume(fbh_env, write_yaml):
    db = fbh_env / "killed.duckdb"
    sub = write_yaml("kill.yaml", {"name": "kill-ta", "method": "task_arithmetic"})
    rng = random.Random(1234)
    for attempt in range(10):
        proc = fbh_process("submit", str(sub), "--db", str(db), "--quiet")
        time.sleep(rng.uniform(0.5, 5.0 + attempt))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        if db.exists():
            assert_consistent(db)
    stored = assert_consistent(db) if db.exists() else {}
    final = fbh_process("submit", str(sub), "--db", str(db))
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    statuses = {}
    for line in out.splitlines():
        parts = line.split()
        statuses[(parts[3], parts[2])] = parts[0]  # (label, setting) -> ok | cached
    after = assert_consistent(db)
    assert len(after) == 6  # 3 references + published row + 2 settings
    for key, (label, setting) in after.items():
        if label == "Made-up paper row":
            continue
        expected = "cached" if key in stored else "ok"
        assert statuses[(label, setting)] == expected, (label, setting, statuses)


def test_two_submits_at_once_on_one_db(fbh_env, write_yaml):
    db = fbh_env / "shared.duckdb"
    subs = [write_yaml("a.yaml", {"name": "conc-ta", "method": "task_arithmetic"}),
            write_yaml("b.yaml", {"name": "conc-avg", "method": "simple_average"})]
    procs = [fbh_process("submit", str(s), "--db", str(db), "--quiet") for s in subs]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        said = [line for line in err.splitlines() if "lock" in line.lower()]
        assert "Traceback" not in err and all(line.startswith("waiting for ") for line in said), err
    runs = assert_consistent(db)
    labels = sorted(runs.values())
    assert labels == sorted([("pretrained", "all"), ("STL", "all"), ("MTL", "all"), ("Made-up paper row", "all"),
                             ("conc-ta", "all"), ("conc-ta", "two-seen"),
                             ("conc-avg", "all"), ("conc-avg", "two-seen")])
    assert {r["name"] for r in Store(db).query("SELECT name FROM submissions")} == {"conc-ta", "conc-avg"}
