"""The issue-21 data-free merges, each submitted end to end (`fbh submit`) from its shipped submission.

The suite is the tests' shrunken tiny-vision suite (the zoo fbh_env builds) with clean test
sets only and no generalization split, so each submission is one job; grids are dropped and
WUDI's and DOGE TA's optimisations shortened, so the smoke stays quick."""

import json

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, small_suite_spec
from harness.cli import main
from harness.store import Store

pytestmark = pytest.mark.slow

STEMS = ["sce", "nuslerp", "multislerp", "karcher", "della_linear", "breadcrumbs_ties", "ram", "ram_plus",
         "wudi", "expo", "pcb_merging", "lines", "cart", "svc", "doge_ta", "consensus_merging"]
QUICK = {"wudi": {"iter_num": 5}, "doge_ta": {"steps": 5}}


@pytest.fixture(scope="module")
def clean_suites(fbh_env, tmp_path_factory):
    """A suites dir holding the shrunken suite reduced to one clean job per submission."""
    suites = tmp_path_factory.mktemp("clean-suites")
    spec = small_suite_spec("tiny-small-clean")
    spec.update(default=False, corruptions=[], generalization=[], references={"computed": ["pretrained"]})
    (suites / "tiny-small-clean.yaml").write_text(yaml.safe_dump(spec))
    return suites


@pytest.mark.parametrize("stem", STEMS)
def test_data_free_merge_submits_end_to_end(fbh_env, clean_suites, write_yaml, monkeypatch, stem):
    monkeypatch.setenv("FBH_SUITES_DIR", str(clean_suites))
    spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
    spec["params"] = {**spec.get("params", {}), **QUICK.get(stem, {})}
    spec.pop("grid", None)
    db = fbh_env / "data-free.duckdb"
    result = CliRunner().invoke(main, ["submit", str(write_yaml(f"{stem}.yaml", spec)), "--suite", "tiny-small-clean",
                                       "--db", str(db), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run, = Store(db).query("SELECT * FROM runs WHERE label = ?", [spec["name"]])
    assert run["status"] == "ok" and run["data_access"] == "none" and run["output_kind"] == "merged", run["error"]
    assert run["setting"] == "all" and json.loads(run["params"]).items() >= spec["params"].items()
    clean = Store(db).query("SELECT value FROM results WHERE run_id = ? AND condition = 'clean'", [run["run_id"]])
    assert len(clean) == 3
    print(f"\n{spec['name']}: fusion {run['fusion_seconds']:.2f} s, clean mean {sum(r['value'] for r in clean) / 3:.1f}")
