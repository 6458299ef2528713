"""Every part-A method submitted end to end on the shrunken tiny-vision suite, with its data use recorded."""

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store
from conftest import REPO

pytestmark = pytest.mark.slow

# The shipped submissions of the methods that read data, made quick for CI (the paper's
# settings are slow on CPU); regmean also searches a grid, so grid selection is covered.
QUICK = {
    "fisher_merging": ({"num_fisher_examples": 16}, {}, "unlabeled_train:16/task"),
    "regmean": ({"num_regmean_examples": 16}, {"reduce_non_diagonal_ratio": [0.5, 1.0]},
                "unlabeled_train:16/task+grid:labeled_validation"),
    "adamerging_layerwise": ({"max_steps": 5}, {}, "unlabeled_test:all/task"),
}


def test_data_reading_methods_submit_end_to_end(fbh_env, write_yaml):
    import yaml
    db = fbh_env / "methods_a.duckdb"
    for method, (params, grid, expected) in QUICK.items():
        spec = yaml.safe_load((REPO / "submissions" / f"{method}.yaml").read_text())
        spec["params"] = {k: v for k, v in {**spec.get("params", {}), **params}.items() if k not in grid}
        spec["grid"] = grid
        result = CliRunner().invoke(main, ["submit", str(write_yaml(f"{method}.yaml", spec)), "--db", str(db),
                                           "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs = Store(db).query("SELECT * FROM runs WHERE label = ?", [spec["name"]])
        assert {r["setting"] for r in runs} == {"all", "two-seen"}
        for run in runs:
            assert run["status"] == "ok" and run["data_access"] == expected, (method, run["data_access"])
            assert json.loads(run["params"]).items() >= spec["params"].items()
            assert (run["grid"] is not None) == bool(grid)
            clean = Store(db).query("SELECT value FROM results WHERE run_id = ? AND condition = 'clean'",
                                    [run["run_id"]])
            assert len(clean) == 3 and all(0 <= r["value"] <= 100 for r in clean)
