"""A method that raises, returns NaN weights or wrong shapes fails only its own run."""


import pytest
import torch
from click.testing import CliRunner

from harness import registry
from harness.api import method
from harness.cli import main
from harness.store import Store
from harness.tensors import map_entries

pytestmark = pytest.mark.slow


def _raises(ctx, params):
    raise RuntimeError("deliberate failure")


def _nan(ctx, params):
    return map_entries(ctx.base, lambda k, b: torch.full_like(b.float(), float("nan")))


def _bad_shape(ctx, params):
    return {k: v.flatten()[:1].clone() for k, v in ctx.base.items()}


@pytest.fixture()
def broken_methods():
    """Registered only for this test, so registry-wide method tests never see them."""
    for name, fn in [("test_raises", _raises), ("test_nan", _nan), ("test_bad_shape", _bad_shape)]:
        method(name, category="merging")(fn)
    yield
    for name in ("test_raises", "test_nan", "test_bad_shape"):
        registry._REGISTRY.pop(name, None)


FAILING = [("test_raises", "deliberate failure"), ("test_nan", "NaN"), ("test_bad_shape", "size mismatch")]


def test_failure_is_recorded_and_others_finish(fbh_env, write_yaml, broken_methods):
    db = fbh_env / "failing.duckdb"
    ok = CliRunner().invoke(main, ["submit", str(write_yaml("ok.yaml", {"name": "avg", "method": "simple_average"})),
                                   "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    store = Store(db)
    for name, reason in FAILING:
        sub = write_yaml(f"{name}.yaml", {"name": name.replace("_", "-"), "method": name})
        res = CliRunner().invoke(main, ["submit", str(sub), "--db", str(db)])
        assert res.exit_code == 1, res.output
        assert "failed" in res.output
        runs = store.query("SELECT label, status, error FROM runs WHERE label = ?", [name.replace("_", "-")])
        assert len(runs) == 2 and all(r["status"] == "failed" and reason in r["error"] for r in runs), runs
        # a re-submit retries failed runs (they are not complete) and keeps one run per key
        CliRunner().invoke(main, ["submit", str(sub), "--db", str(db)])
        assert len(store.query("SELECT 1 FROM runs WHERE label = ?", [name.replace("_", "-")])) == 2
    # the other runs are complete and untouched, and failed runs have no result rows
    ok_runs = store.query("SELECT label FROM runs WHERE status = 'ok'")
    assert {r["label"] for r in ok_runs} == {"pretrained", "STL", "MTL", "avg", "Made-up paper row"}
    assert store.query("SELECT count(*) AS n FROM results JOIN runs USING (run_id) WHERE status = 'failed'"
                       )[0]["n"] == 0


def test_fusion_over_the_suite_budget_fails_its_run_naming_the_time(fbh_env, write_yaml, tmp_path, monkeypatch):
    """A suite's fusion_budget_seconds bounds what one run's fusion may cost: a method over it
    fails its own run with the measured time and the suite field; the references still run."""
    import yaml
    from conftest import small_suite_spec
    suites = tmp_path / "budget-suites"
    suites.mkdir()
    spec = small_suite_spec()
    spec.update(name="tiny-budget", fusion_budget_seconds=1e-6)
    (suites / "tiny-budget.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    db = tmp_path / "budget.duckdb"
    sub = write_yaml("avg.yaml", {"name": "avg", "method": "simple_average"})
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-budget", "--db", str(db)])
    assert res.exit_code == 1, res.output
    runs = Store(db).query("SELECT kind, status, error FROM runs")
    failed = [r for r in runs if r["status"] == "failed"]
    assert failed and all(r["kind"] == "submission" for r in failed)
    assert all("over the suite's budget of 1e-06 s" in r["error"] and "fusion_budget_seconds" in r["error"]
               for r in failed), failed
    assert {r["status"] for r in runs if r["kind"] == "reference"} == {"ok"}
