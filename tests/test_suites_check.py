"""`fbh suites check NAME`: every input a suite reads, found or not, offline, against a fake HF cache
laid out as downloads leave it (models--org--name/snapshots/<commit>/... and refs/main)."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from conftest import small_suite_spec
from test_trust import fake_hub_snapshot

COMMIT, PIN = "a" * 40, "c" * 40
MODEL_FILES = {"config.json": b"{}", "model.safetensors": b"x"}


def write_hub_suite(root, **family) -> None:
    spec = {"name": "hubby", "family": {"kind": "gpt2_classification", "base": "org/base",
                                        "experts": {"cola": "org/cola-expert"}, **family},
            "tasks": [{"name": "cola", "dataset": "org/glue", "revision": PIN}]}
    (root / "suites" / "hubby.yaml").write_text(yaml.safe_dump(spec))


def hub_cache(private_env, monkeypatch):
    import huggingface_hub.constants
    cache = private_env / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def check(name: str = "hubby"):
    from harness.runner import find_suite
    from harness.suites import check_suite
    return check_suite(*find_suite(name))


def test_one_model_present_one_missing(private_env, monkeypatch):
    cache = hub_cache(private_env, monkeypatch)
    write_hub_suite(private_env)
    fake_hub_snapshot(cache, "org/base", COMMIT, MODEL_FILES | {"tokenizer.json": b"{}"})
    fake_hub_snapshot(cache, "org/glue", PIN, {"cola/validation-00000.parquet": b"x"}, kind="dataset")

    result = check()
    by_ref = {i.ref: i for i in result.inputs}
    assert list(by_ref) == ["org/base", "org/cola-expert", "org/glue"]
    base, expert, data = by_ref.values()
    assert base.present and base.revision == COMMIT and not base.pinned  # what refs/main resolves
    assert base.location.endswith(f"snapshots/{COMMIT}")
    assert not expert.present and expert.location is None and expert.revision is None
    assert expert.fetch == "hf download org/cola-expert"
    assert data.present and data.revision == PIN and data.pinned and data.repo_type == "dataset"
    assert not result.runnable and result.fetch_commands() == ["hf download org/cola-expert"]

    from harness.cli import main
    out = CliRunner().invoke(main, ["suites", "check", "hubby"])
    assert out.exit_code == 1, out.output
    assert "missing    model   org/cola-expert" in out.output and "  hf download org/cola-expert" in out.output
    assert f"revision {COMMIT} (local cache, unpinned)" in out.output and f"revision {PIN};" in out.output
    assert "hubby: 2/3 inputs present; cannot run yet" in out.output
    out = CliRunner().invoke(main, ["suites", "check", "hubby", "--commands"])
    assert out.exit_code == 1 and out.output == "hf download org/cola-expert\n"

    # Once the expert is downloaded the suite can run, and the check says so with exit 0.
    fake_hub_snapshot(cache, "org/cola-expert", COMMIT, MODEL_FILES)
    out = CliRunner().invoke(main, ["suites", "check", "hubby"])
    assert out.exit_code == 0, out.output
    assert "hubby: 3/3 inputs present; can run" in out.output and "hf download" not in out.output


def test_incomplete_snapshots_and_unmet_pins_are_missing(private_env, monkeypatch):
    cache = hub_cache(private_env, monkeypatch)
    write_hub_suite(private_env, revisions={"org/cola-expert": PIN})
    fake_hub_snapshot(cache, "org/base", COMMIT, {"config.json": b"{}"})  # no weights, no tokenizer
    fake_hub_snapshot(cache, "org/cola-expert", COMMIT, MODEL_FILES)      # present, but not at the pin
    fake_hub_snapshot(cache, "org/glue", COMMIT, {"data.parquet": b"x"}, kind="dataset")  # not at the pin

    base, expert, data = check().inputs
    assert base.location is not None and not base.present
    assert base.missing == ("*.safetensors", "tokenizer.json|vocab.json|spiece.model")
    assert base.fetch == "hf download org/base"
    assert not expert.present and expert.revision == PIN
    assert expert.fetch == f"hf download org/cola-expert --revision {PIN}"
    assert not data.present and data.fetch == f"hf download org/glue --repo-type dataset --revision {PIN}"


def test_local_paths_and_zoo_suites(private_env, monkeypatch):
    hub_cache(private_env, monkeypatch)
    (private_env / "suites" / "local.yaml").write_text(yaml.safe_dump({
        "name": "local", "family": {"kind": "gpt2_classification", "base": "../gpt2", "experts": {"cola": "../cola"}},
        "tasks": [{"name": "cola", "dataset": "../data/cola"}]}))
    (private_env / "gpt2").mkdir()
    for name, data in MODEL_FILES.items():
        (private_env / "gpt2" / name).write_bytes(data)
    (private_env / "gpt2" / "vocab.json").write_text("{}")
    base, expert, data = check("local").inputs
    assert base.present and base.revision is None and base.fetch is None
    assert not expert.present and expert.fetch is None and not data.present

    # A tiny-vision zoo suite reads nothing from the hub: its zoo builds offline, so it can run.
    (private_env / "suites" / "tiny-small.yaml").write_text(yaml.safe_dump(small_suite_spec()))
    result = check("tiny-small")
    assert result.inputs == [] and result.runnable and "builds offline" in result.note


def test_a_hub_model_downloaded_as_pickles_only_is_refused_by_validate_and_submit(private_env, monkeypatch):
    """Caught from the local snapshot before anything is written, as a local pickle is; allow_pickle lets it by."""
    cache = hub_cache(private_env, monkeypatch)
    write_hub_suite(private_env)
    fake_hub_snapshot(cache, "org/base", COMMIT, MODEL_FILES | {"tokenizer.json": b"{}"})
    fake_hub_snapshot(cache, "org/cola-expert", COMMIT, {"config.json": b"{}", "pytorch_model.bin": b"\x80"})
    from harness.cli import main
    path = private_env / "suites" / "hubby.yaml"
    sub = private_env / "sub.yaml"
    sub.write_text("name: ok-sub\nmethod: task_arithmetic\n")
    for args in (["validate", str(path)], ["submit", str(sub), "--suite", "hubby"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "field 'family.experts.cola'" in res.output and "only pickle weights" in res.output
        assert "allow_pickle" in res.output
    assert not (private_env / "results.duckdb").exists()
    write_hub_suite(private_env, allow_pickle=True)
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0
