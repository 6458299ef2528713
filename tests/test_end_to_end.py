"""`fbh submit` end to end on a shrunken tiny-vision suite: zoo -> fusion -> DuckDB -> leaderboard."""

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store
from conftest import REPO, SMALL_TASKS

pytestmark = pytest.mark.slow


def fbh(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_submit_stores_complete_runs_and_leaderboard(fbh_env):
    db = fbh_env / "e2e.duckdb"
    res = fbh("submit", str(REPO / "submissions" / "task_arithmetic.yaml"), "--db", str(db))
    assert res.exit_code == 0, res.output
    store = Store(db)
    runs = store.query("SELECT * FROM runs ORDER BY kind, label, setting")
    labels = {(r["kind"], r["label"], r["setting"]) for r in runs}
    assert {("reference", "pretrained", "all"), ("reference", "STL", "all"), ("reference", "MTL", "all"),
            ("published", "Made-up paper row", "all"), ("submission", "task-arithmetic", "all"),
            ("submission", "task-arithmetic", "two-seen")} <= labels
    sub = next(r for r in runs if r["label"] == "task-arithmetic" and r["setting"] == "all")
    assert sub["status"] == "ok" and sub["device"].startswith("cpu")
    assert json.loads(sub["params"]) == {"scaling_factor": 0.3}
    assert sub["fusion_seconds"] > 0 and sub["peak_memory_bytes"] > 0 and sub["n_parameters"] > 0
    assert json.loads(sub["packages"])["torch"].startswith("2.13")
    rows = store.query("SELECT * FROM results WHERE run_id = ?", [sub["run_id"]])
    clean = [r for r in rows if r["condition"] == "clean"]
    assert sorted(r["task"] for r in clean) == sorted(SMALL_TASKS)
    assert {r["condition"] for r in rows} == {"clean", "gaussian_noise", "jpeg"}
    for r in rows:
        assert 0 <= r["value"] <= 100 and r["n"] == 48 and r["ci_low"] <= r["value"] <= r["ci_high"]
    gen = next(r for r in runs if r["setting"] == "two-seen")
    split = {r["task"]: r["task_split"] for r in store.query("SELECT * FROM results WHERE run_id = ?",
                                                             [gen["run_id"]])}
    assert split == {"digits": "seen", "shapes": "seen", "textures": "unseen"}

    # Re-submitting unchanged work recomputes nothing.
    again = fbh("submit", str(REPO / "submissions" / "task_arithmetic.yaml"), "--db", str(db))
    assert again.exit_code == 0
    head, rule, *lines = [line for line in again.output.splitlines() if line.strip()]
    assert head.split()[:4] == ["status", "suite", "setting", "entry"] and set(rule) <= {"-", " "}
    assert [line.split()[0] for line in lines] == ["cached"] * 5  # 3 references + 2 settings
    assert store.counts()["runs"] == len(runs)

    board = fbh("leaderboard", "--suite", "tiny-small", "--db", str(db), "--format", "json")
    data = json.loads(board.output)
    assert data["tasks"] == SMALL_TASKS
    assert [e["label"] for e in data["entries"][:3]] == ["pretrained", "STL", "MTL"]
    stl = data["entries"][1]
    assert stl["normalized"] == pytest.approx(100.0)
    csv_out = fbh("leaderboard", "--suite", "tiny-small", "--db", str(db), "--format", "csv").output
    assert csv_out.splitlines()[0].startswith("rank,kind,label,method,digits")


def test_ensemble_and_grid_search(fbh_env, write_yaml):
    db = fbh_env / "grid.duckdb"
    sub = write_yaml("grid.yaml", {"name": "ta-grid", "method": "task_arithmetic",
                                   "grid": {"scaling_factor": [0.0, 0.5, 1.0]}})
    assert fbh("submit", str(sub), "--db", str(db), "--quiet").exit_code == 0
    assert fbh("submit", str(REPO / "submissions" / "simple_ensemble.yaml"), "--db", str(db),
               "--quiet").exit_code == 0
    store = Store(db)
    run = store.query("SELECT * FROM runs WHERE label = 'ta-grid' AND setting = 'all'")[0]
    grid = json.loads(run["grid"])
    assert [g["params"]["scaling_factor"] for g in grid] == [0.0, 0.5, 1.0]
    best = max(grid, key=lambda g: g["validation_mean"])
    assert json.loads(run["params"])["scaling_factor"] == best["params"]["scaling_factor"]
    ens = store.query("SELECT * FROM runs WHERE label = 'simple-ensemble' AND setting = 'all'")[0]
    base = store.query("SELECT n_parameters FROM runs WHERE label = 'pretrained'")[0]["n_parameters"]
    assert ens["output_kind"] == "ensemble" and ens["n_parameters"] == 3 * base


def test_cli_lists_and_validates(fbh_env):
    out = fbh("methods", "list").output
    assert "task_arithmetic" in out and "ties_merging" in out
    out = fbh("suites", "list").output
    assert "tiny-small" in out and "available" in out
    bad = fbh("validate", str(REPO / "pyproject.toml"))
    assert bad.exit_code == 2
    for cmd in [[], ["submit"], ["leaderboard"], ["suites", "list"], ["zoo", "build"], ["validate"]]:
        assert fbh(*cmd, "--help").exit_code == 0


def test_zoo_is_the_same_with_one_fine_tuning_worker_or_several_forked_or_spawned(fbh_env, tmp_path, monkeypatch):
    """Experts and the MTL model are fine-tuned in parallel processes, each single-threaded and
    seeded by its job, so the number of cores must not change a single weight."""
    import torch
    from safetensors.torch import load_file
    from conftest import SMALL_RECIPE
    from harness.zoo import resolved_recipe, tiny_vision
    recipe = resolved_recipe("tiny_vision", SMALL_RECIPE)
    tiny_vision.build(tmp_path / "parallel", recipe, lambda m: None)
    # Where a GPU is visible the workers are spawned and sent the data, not forked.
    with monkeypatch.context() as gpu_visible:
        gpu_visible.setattr(torch.cuda, "is_available", lambda: True)
        tiny_vision.build(tmp_path / "spawned", recipe, lambda m: None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    tiny_vision.build(tmp_path / "serial", recipe, lambda m: None)
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.safetensors"))
    assert len(files) == len(recipe["tasks"]) + 3  # experts, MTL, base, heads
    for other in ("parallel", "spawned"):
        for f in files:
            a, b = load_file(tmp_path / "serial" / f), load_file(tmp_path / other / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (other, f)


def test_expert_outputs_are_computed_once_for_every_ensemble(fbh_env, write_yaml, tmp_path, monkeypatch):
    """A stored expert's logits on a test set are cached: once the simple ensemble has run, the
    weighted ensemble (uniform weights) and the max-model predictor need no forward pass of
    any expert, and the weighted ensemble's rows equal the simple ensemble's."""
    from harness.families.clip_vision import ClipVisionFamily
    db = tmp_path / "outputs.duckdb"
    assert fbh("submit", str(REPO / "submissions" / "simple_ensemble.yaml"), "--db", str(db),
               "--quiet").exit_code == 0

    def no_forward(self, model, task, inputs):
        raise AssertionError("an expert's outputs were computed again")
    monkeypatch.setattr(ClipVisionFamily, "logits", no_forward)
    for name in ("weighted_ensemble", "max_model_predictor"):
        res = fbh("submit", str(REPO / "submissions" / f"{name}.yaml"), "--db", str(db), "--quiet")
        assert res.exit_code == 0, res.output
    rows = {label: sorted((r["task"], r["condition"], r["value"]) for r in Store(db).query(
        "SELECT task, condition, value FROM results JOIN runs USING (run_id) WHERE label = ? AND setting = 'all'",
        [label])) for label in ("simple-ensemble", "weighted-ensemble")}
    assert rows["simple-ensemble"] and rows["simple-ensemble"] == rows["weighted-ensemble"]
