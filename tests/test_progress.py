"""Long steps say where they are: a job counter, and one line per evaluation step with an ETA in logs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.progress import Steps
from conftest import REPO


def test_steps_count_and_estimate_in_logs():
    said = []
    with Steps(3, "evaluating", said.append) as steps:
        for name in ("a", "b", "c"):
            steps.next(name)
    assert said[0] == "  [1/3] evaluating a" and said[2].startswith("  [3/3] evaluating c, ETA")
    with Steps(2, "quiet", None) as steps:  # no reporter: nothing to say, nothing fails
        steps.next("x")


@pytest.mark.slow
def test_submit_reports_jobs_and_evaluation_steps(fbh_env, tmp_path):
    res = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / "task_arithmetic.yaml"),
                                    "--db", str(tmp_path / "p.duckdb")])
    assert res.exit_code == 0, res.output
    log = res.stderr
    assert "[1/5] tiny-small/all: pretrained" in log and "[5/5] tiny-small/two-seen: task-arithmetic" in log
    assert "[9/9] evaluating on test textures/jpeg@2, ETA" in log
