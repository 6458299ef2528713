"""The issue-21 data-free merges, each submitted end to end (`fbh submit`) on the shrunken tiny-vision suite
from its shipped submission: grids dropped and WUDI's optimisation shortened, so the smoke stays quick."""

import json

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from harness.cli import main
from harness.store import Store

pytestmark = pytest.mark.slow

STEMS = ["sce", "nuslerp", "multislerp", "karcher", "della_linear", "breadcrumbs_ties", "ram", "ram_plus",
         "wudi", "expo", "pcb_merging", "lines", "cart", "svc", "doge_ta", "consensus_merging"]
QUICK = {"wudi": {"iter_num": 5}}


@pytest.mark.parametrize("stem", STEMS)
def test_data_free_merge_submits_end_to_end(fbh_env, write_yaml, stem):
    spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
    spec["params"] = {**spec.get("params", {}), **QUICK.get(stem, {})}
    spec.pop("grid", None)
    db = fbh_env / "data-free.duckdb"
    result = CliRunner().invoke(main, ["submit", str(write_yaml(f"{stem}.yaml", spec)), "--db", str(db), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = Store(db).query("SELECT * FROM runs WHERE label = ?", [spec["name"]])
    assert {r["setting"] for r in runs} == {"all", "two-seen"}
    for run in runs:
        assert run["status"] == "ok" and run["data_access"] == "none" and run["output_kind"] == "merged", run["error"]
        assert json.loads(run["params"]).items() >= spec["params"].items()
    run = next(r for r in runs if r["setting"] == "all")
    clean = Store(db).query("SELECT value FROM results WHERE run_id = ? AND condition = 'clean'", [run["run_id"]])
    assert len(clean) == 3
    print(f"\n{spec['name']}: fusion {run['fusion_seconds']:.2f} s, clean mean "
          f"{sum(r['value'] for r in clean) / 3:.1f}")
