"""The real suites in suites/: valid, in step with the catalog, listed with availability;
unavailable ones stop `fbh submit` with a clear message, or are skipped among others."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, small_suite_spec
from harness.cli import main
from harness.spec import load_suite

REAL = sorted(p for p in (REPO / "suites").glob("*.yaml") if p.stem != "tiny-vision")


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path / "hf-hub"


def fake_hub_copy(cache, kind: str, repo_id: str) -> None:
    """What a download leaves in the HF cache, as far as scan_cache_dir is concerned."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / "0").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / "0" / "config.json").write_text("{}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0")


def test_real_suites_cover_the_issue():
    names = {p.stem for p in REAL}
    for backbone in ("b32", "b16", "l14"):
        assert {f"clip-vit-{backbone}-{n}tasks" for n in (8, 14, 20)} <= names
    assert {"clip-vit-b32-robustness", "gpt2-glue", "flan-t5-base-glue", "flan-t5-base-lora-glue",
            "flan-t5-large-lora-glue"} <= names
    for path in REAL:
        suite = load_suite(path)
        assert suite.name == path.stem and suite.family.zoo is None
    b32 = load_suite(REPO / "suites" / "clip-vit-b32-8tasks.yaml")
    assert b32.family.base == "openai/clip-vit-base-patch32" and b32.family.heads == "zero_shot"
    assert b32.family.experts["sun397"] == "tanganke/clip-vit-base-patch32_sun397"
    assert all(t.classes and t.templates for t in b32.tasks) and len(b32.task("sun397").classes) == 397
    assert [g.name for g in b32.generalization] == ["exp1-table5", "exp2-table16"]
    table3 = {r.label: r for r in b32.references.published if r.source == "FusionBench Table 3"}
    assert table3["Task Arithmetic"].values["sun397"] == 57.1
    robust = load_suite(REPO / "suites" / "clip-vit-b32-robustness.yaml")
    assert len(robust.corruptions) == 7 and robust.task_names == ["stanford-cars", "eurosat", "resisc45", "gtsrb"]
    lora = load_suite(REPO / "suites" / "flan-t5-base-lora-glue.yaml")
    assert lora.family.experts["stsb"] == "tanganke/flan-t5-base_glue-stsb_lora-16"
    assert lora.task("stsb").metric == "spearman" and lora.task("mnli").split == "validation_matched"


def test_suite_files_match_the_catalog(tmp_path):
    pytest.importorskip("fusion_bench", reason="the catalog reads class names and templates from fusion-bench")
    from harness.families.catalog import write_all
    for path in write_all(tmp_path):
        shipped = REPO / "suites" / path.relative_to(tmp_path)
        assert path.read_text() == shipped.read_text(), f"regenerate {shipped}"


def test_suites_list_reports_availability(tmp_path, monkeypatch, empty_hf_cache):
    monkeypatch.setenv("FBH_SUITES_DIR", str(tmp_path / "suites"))
    shutil.copytree(REPO / "suites", tmp_path / "suites")
    out = CliRunner().invoke(main, ["suites", "list"]).output
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {p.stem for p in (REPO / "suites").glob("*.yaml")}
    assert "available" in lines["tiny-vision"].split()
    for path in REAL:
        assert "unavailable" in lines[path.stem].split(), lines[path.stem]
    assert "openai/clip-vit-base-patch32" in lines["clip-vit-b32-8tasks"]

    # Once every model and dataset is in the HF cache, the suite is available.
    suite = load_suite(REPO / "suites" / "gpt2-glue.yaml")
    for ref in [suite.family.base, *suite.family.experts.values()]:
        fake_hub_copy(empty_hf_cache, "model", ref)
    fake_hub_copy(empty_hf_cache, "dataset", "nyu-mll/glue")
    out = CliRunner().invoke(main, ["suites", "list"]).output
    assert "available" in next(line for line in out.splitlines() if line.startswith("gpt2-glue")).split()


def test_unavailable_suite_is_a_clear_error_or_skipped(fbh_env, tmp_path, monkeypatch, empty_hf_cache):
    suites = tmp_path / "suites"
    suites.mkdir()
    cheap = small_suite_spec() | {"corruptions": [], "generalization": [], "references": {"computed": []}}
    (suites / "tiny-small.yaml").write_text(yaml.safe_dump(cheap))  # the session's zoo, fewest runs
    shutil.copy(REPO / "suites" / "clip-vit-b32-8tasks.yaml", suites)
    shutil.copytree(REPO / "suites" / "_include", suites / "_include")  # the task files it includes
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    sub, db = str(REPO / "submissions" / "task_arithmetic.yaml"), str(tmp_path / "r.duckdb")

    alone = CliRunner().invoke(main, ["submit", sub, "--suite", "clip-vit-b32-8tasks", "--db", db])
    assert alone.exit_code == 2 and "Traceback" not in alone.output
    assert "suite 'clip-vit-b32-8tasks' is unavailable" in alone.output
    assert "openai/clip-vit-base-patch32" in alone.output and "fix:" in alone.output

    both = CliRunner().invoke(main, ["submit", sub, "--suite", "clip-vit-b32-8tasks", "--suite", "tiny-small",
                                     "--db", db, "--json"])
    assert both.exit_code == 0, both.output
    statuses = [(o["status"], o["suite"]) for o in json.loads(both.stdout)["outcomes"]]
    assert statuses[0] == ("skipped", "clip-vit-b32-8tasks")
    assert ("ok", "tiny-small") in statuses or ("cached", "tiny-small") in statuses
