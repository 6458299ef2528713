"""`fbh submit --limit N`: a quick smoke run on the first N examples of each task, stored as such and never
ranked with full runs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store
from conftest import REPO

pytestmark = pytest.mark.slow


def fbh(*args):
    return CliRunner().invoke(main, list(args))


def test_smoke_runs_are_stored_apart_and_never_ranked_with_full_runs(fbh_env, tmp_path):
    db = str(tmp_path / "smoke.duckdb")
    sub = str(REPO / "submissions" / "task_arithmetic.yaml")
    assert fbh("submit", sub, "--db", db, "--limit", "10", "--quiet").exit_code == 0
    store = Store(db)
    runs = store.query("SELECT run_id, kind, example_limit FROM runs WHERE kind != 'published'")
    assert runs and {r["example_limit"] for r in runs} == {10}
    assert {r["n"] for r in store.query("SELECT n FROM results JOIN runs USING (run_id) WHERE kind != 'published'")} == {10}

    full = json.loads(fbh("leaderboard", "--db", db, "--json").stdout)
    assert [e["kind"] for e in full["entries"]] == ["published"]  # only the paper's row: nothing computed in full
    smoke = json.loads(fbh("leaderboard", "--db", db, "--json", "--limit", "10").stdout)
    assert smoke["example_limit"] == 10
    assert {e["label"] for e in smoke["entries"]} == {"pretrained", "STL", "MTL", "task-arithmetic"}

    assert fbh("submit", sub, "--db", db, "--quiet").exit_code == 0  # the full run supersedes no smoke run
    again = json.loads(fbh("leaderboard", "--db", db, "--json", "--limit", "10").stdout)
    assert {e["run_id"] for e in again["entries"]} == {e["run_id"] for e in smoke["entries"]}
    ranked = json.loads(fbh("leaderboard", "--db", db, "--json").stdout)
    assert not {e["run_id"] for e in ranked["entries"]} & {e["run_id"] for e in smoke["entries"]}
    assert "Made-up paper row" in {e["label"] for e in ranked["entries"]}
