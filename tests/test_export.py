"""`fbh export`: a leaderboard entry's fused model saved with save_pretrained and a model card; the saved
weights give back the stored scores."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store
from conftest import shipped_submissions_db

pytestmark = pytest.mark.slow


def fbh(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def exported_db(fbh_env):
    return shipped_submissions_db(fbh_env / "export.duckdb", ["ties_merging", "simple_ensemble"])


def test_exported_model_gives_back_the_stored_scores(exported_db, tmp_path):
    from transformers import CLIPVisionModel
    from harness.evaluate import as_predictor, evaluate
    from harness.runner import open_suite
    res = fbh("export", "ties-merging", "--out", str(tmp_path / "m"), "--db", str(exported_db))
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    card = (tmp_path / "m" / "README.md").read_text()
    run = Store(exported_db).query("SELECT * FROM runs WHERE submission = 'ties-merging' AND setting = 'all' "
                                   "AND status = 'ok'")[0]
    assert run["fingerprint"] in card and run["run_id"] in card and '"top_k": 0.2' in card

    family = open_suite("tiny-small", torch.device("cpu"), progress=lambda m: None).family
    model = CLIPVisionModel.from_pretrained(tmp_path / "m")
    rows = evaluate(as_predictor(model.state_dict(), family), family,
                    [(t, "seen") for t in family.suite.task_names], batch_size=64)
    stored = {r["task"]: r["value"] for r in Store(exported_db).query(
        "SELECT task, value FROM results WHERE run_id = ? AND condition = 'clean'", [run["run_id"]])}
    assert {r.task: r.value for r in rows} == stored


@pytest.mark.parametrize("args, field", [
    (["simple-ensemble"], "SUBMISSION"),          # an ensemble is its experts, not one model
    (["nope"], "SUBMISSION"),
    (["ties-merging", "--push-to-hub", "me/x"], "--push-to-hub"),  # no token here
])
def test_what_cannot_be_exported_is_refused_before_any_work(exported_db, tmp_path, monkeypatch, args, field):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = fbh("export", *args, "--out", str(tmp_path / "m"), "--db", str(exported_db))
    assert res.exit_code == 2 and "Traceback" not in res.output and field in res.output and "fix:" in res.output
    assert not (tmp_path / "m").exists()


def test_a_non_empty_output_folder_is_refused(exported_db, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "CNAME").write_text("keep me")
    res = fbh("export", "ties-merging", "--out", str(tmp_path / "m"), "--db", str(exported_db))
    assert res.exit_code == 2 and "--out" in res.output
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["CNAME"]
