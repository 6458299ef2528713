"""Representative methods-b submissions run end to end on the shrunken tiny-vision suite.

One per kind (seeded merge, SVD merge, larger zero-shot model, test-time training), to keep
CI short; every submission in SUBMISSIONS passed this test once (set FBH_ALL_METHODS_B=1).
"""

import json
import os

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from harness.cli import main
from harness.store import Store

pytestmark = pytest.mark.slow

SUBMISSIONS = ["dare", "dare_ties", "breadcrumbs", "magmax", "model_stock", "slerp", "tsv_merging", "iso_c",
               "iso_cts", "della", "moe_upscaling", "moe_merging", "smile_upscaling", "depth_upscaling",
               "model_recombination", "we_moe"]


REPRESENTATIVE = ["dare", "iso_cts", "smile_upscaling", "we_moe"]


@pytest.mark.parametrize("stem", SUBMISSIONS if os.environ.get("FBH_ALL_METHODS_B") else REPRESENTATIVE)
def test_submission_runs_on_the_small_suite(fbh_env, tmp_path, stem):
    spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
    if stem == "we_moe":
        spec["params"]["max_steps"] = 3  # the method's training loop, kept short for CI
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    db = fbh_env / "methods-b.duckdb"
    res = CliRunner().invoke(main, ["submit", str(path), "--db", str(db), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = Store(db).query("SELECT * FROM runs WHERE label = ? AND setting = 'all'", [spec["name"]])[0]
    rows = Store(db).query("SELECT * FROM results WHERE run_id = ? AND condition = 'clean'", [run["run_id"]])
    mean = sum(r["value"] for r in rows) / len(rows)
    print(f"\n{spec['name']}: clean mean {mean:.1f} n_parameters {run['n_parameters']} "
          f"output {run['output_kind']} data {run['data_access']}")
    assert run["status"] == "ok" and len(rows) == 3
    stored = json.loads(run["params"])  # every hyperparameter, defaults included
    assert all(stored[k] == v for k, v in spec.get("params", {}).items())
