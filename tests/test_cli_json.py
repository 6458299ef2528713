"""The CLI's machine-readable answers (--json) and several submissions in one command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store
from conftest import REPO


def fbh(*args):
    return CliRunner().invoke(main, list(args))


def test_validate_json_reports_each_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: ties_merging\nparams: {top_k: 7}\n")
    res = fbh("validate", str(REPO / "submissions" / "task_arithmetic.yaml"), str(bad), "--json")
    assert res.exit_code == 2
    files = json.loads(res.stdout)["files"]
    assert files[0] == {"file": str(REPO / "submissions" / "task_arithmetic.yaml"), "ok": True, "kind": "submission"}
    assert files[1]["ok"] is False and files[1]["field"] == "params.top_k" and files[1]["fix"]


def test_suites_list_json(fbh_env):
    listed = {s["name"]: s for s in json.loads(fbh("suites", "list", "--json").stdout)["suites"]}
    assert listed["tiny-small"]["status"] == "available" and listed["tiny-small"]["tasks"] == ["digits", "shapes",
                                                                                             "textures"]


@pytest.mark.slow
def test_several_submissions_in_one_command_are_all_validated_first(fbh_env, tmp_path):
    db = tmp_path / "multi.duckdb"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nmethod: task_arithmetic\nparams: {scaling_factor: many}\n")
    first = str(REPO / "submissions" / "task_arithmetic.yaml")
    res = fbh("submit", first, str(broken), "--db", str(db))
    assert res.exit_code == 2 and "scaling_factor" in res.output and not db.exists()  # nothing ran
    res = fbh("submit", first, str(REPO / "submissions" / "simple_average.yaml"), "--db", str(db), "--json", "--quiet")
    assert res.exit_code == 0, res.output
    outcomes = json.loads(res.stdout)["outcomes"]
    assert {o["label"] for o in outcomes if o["status"] == "ok"} >= {"task-arithmetic", "simple-average"}
    assert Store(db).query("SELECT count(DISTINCT submission) AS n FROM runs WHERE kind = 'submission'")[0]["n"] == 2
