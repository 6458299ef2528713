"""Suite precision (float32 / bfloat16 / float16) and CUDA: every shipped submission runs in a
half-precision suite, and on a GPU, and agrees with the float32 CPU results.

The CUDA tests run where a GPU is visible (the device machine; README, 'GPU'); without one
they are skipped, and FBH_REQUIRE_CUDA=1 turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import REPO, small_suite_spec
from harness import runner
from harness.store import Store

pytestmark = pytest.mark.slow

# The shipped submissions' settings, shortened where a method reads data or trains, so that
# all of them run in a minute on the shrunken suite.
QUICK = {
    "fisher_merging": {"num_fisher_examples": 16},
    "regmean": {"num_regmean_examples": 16},
    "adamerging_layerwise": {"max_steps": 3},
    "adamerging_taskwise": {"max_steps": 3},
    "we_moe": {"max_steps": 3},
}
# Methods whose result involves training steps: on a GPU their float32 arithmetic differs in
# the last bits from the CPU's, and training can carry that further than one prediction.
TRAINED = {"adamerging_layerwise", "adamerging_taskwise", "we_moe", "fisher_merging"}
STEMS = sorted(p.stem for p in (REPO / "submissions").glob("*.yaml"))


def needs_cuda():
    if torch.cuda.is_available():
        return
    if os.environ.get("FBH_REQUIRE_CUDA"):
        pytest.fail("no CUDA device is visible, and FBH_REQUIRE_CUDA=1 requires one")
    pytest.skip("needs a CUDA device (run on the device machine with FBH_REQUIRE_CUDA=1)")


@pytest.fixture()
def variants(fbh_env, tmp_path, monkeypatch):
    """A suites dir holding the shrunken suite at each precision, clean test sets only and no
    generalization split (one job per submission); they share the zoo built by fbh_env."""
    suites = tmp_path / "suites"
    suites.mkdir()
    for precision in ("float32", "bfloat16", "float16"):
        spec = small_suite_spec(f"tiny-small-{precision}")
        spec.update(default=False, precision=precision, corruptions=[], generalization=[])
        spec["references"] = {"computed": ["pretrained"]}
        (suites / f"tiny-small-{precision}.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    return tmp_path


def quick_submission(stem: str, folder) -> str:
    spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
    grid = spec.pop("grid", None) or {}  # a grid's first point, as fixed params
    spec["params"] = {**spec.get("params", {}), **{k: v[0] for k, v in grid.items()}, **QUICK.get(spec["method"], {})}
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def run_all(stems, suite: str, device: str, folder) -> dict[str, dict]:
    """label -> {'run': run row, 'values': {task: clean accuracy}} for every stem (and the references)."""
    db = folder / f"{suite}-{device}.duckdb"
    for stem in stems:
        runner.submit(quick_submission(stem, folder), suites=[suite], db=db, device=device,
                      progress=lambda _: None)
    store = Store(db)
    out = {}
    for run in store.query("SELECT * FROM runs"):
        rows = store.query("SELECT task, value FROM results WHERE run_id = ?", [run["run_id"]])
        out[run["label"]] = {"run": run, "values": {r["task"]: r["value"] for r in rows}}
    return out


def method_of(label: str, stems) -> str:
    for stem in stems:
        spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
        if spec["name"] == label:
            return spec["method"]
    return label


def assert_all_ok(results: dict, n_expected: int) -> None:
    failed = {label: r["run"]["error"] for label, r in results.items() if r["run"]["status"] != "ok"}
    assert not failed, failed
    assert len(results) == n_expected


def max_gap(a: dict, b: dict) -> float:
    return max(abs(a["values"][t] - b["values"][t]) for t in a["values"])


def test_the_suite_precision_is_how_models_are_held_merged_and_run(variants):
    from harness.evaluate import as_predictor
    handle = runner.open_suite("tiny-small-bfloat16", torch.device("cpu"), progress=lambda _: None)
    family = handle.family
    expert = family.expert_state("digits")
    assert all(v.dtype == torch.bfloat16 for v in expert.values() if v.is_floating_point())
    from harness import registry
    info = registry.get("task_arithmetic")
    from harness.isolation import isolated_fuse  # the way every run fuses: bf16 tensors there and back
    merged = isolated_fuse(handle, ["digits", "shapes"], info, info.validate_params({"scaling_factor": 0.3}), 0,
                           torch.device("cpu")).value
    assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.is_floating_point())
    # merged in float32 from the bf16 experts, rounded once
    base, e1, e2 = family.base_state(), expert, family.expert_state("shapes")
    for k, b in base.items():
        if b.is_floating_point():
            b = b.float()
            expected = (b + 0.3 * ((e1[k].float() - b) + (e2[k].float() - b))).to(torch.bfloat16)
            assert torch.equal(merged[k], expected), k
    model = as_predictor(merged, family).members[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_every_submission_runs_in_bfloat16_close_to_float32(variants):
    """bf16 keeps ~3 significant digits: the tiny models' predictions move by a few test
    examples at most (48 per task), never by a wholesale failure."""
    half = run_all(STEMS, "tiny-small-bfloat16", "cpu", variants)
    assert_all_ok(half, len(STEMS) + 1)
    full = run_all(["simple_average", "task_arithmetic", "ties_merging", "simple_ensemble"], "tiny-small-float32",
                   "cpu", variants)
    for label, result in full.items():
        gap = max_gap(result, half[label])
        print(f"{label}: bf16 - fp32 max gap {gap:.1f} points")
        assert gap <= 100 * 4 / 48, (label, result["values"], half[label]["values"])


def test_every_submission_runs_on_cuda_as_on_the_cpu(variants):
    needs_cuda()
    cpu = run_all(STEMS, "tiny-small-float32", "cpu", variants)
    gpu = run_all(STEMS, "tiny-small-float32", "cuda", variants)
    assert_all_ok(gpu, len(STEMS) + 1)
    assert all(r["run"]["device"].startswith("cuda:") for r in gpu.values())
    for label, result in gpu.items():
        gap = max_gap(result, cpu[label])
        print(f"{label}: cuda - cpu max gap {gap:.2f} points")
        allowed = 100 * (6 if method_of(label, STEMS) in TRAINED else 1) / 48
        assert gap <= allowed, (label, result["values"], cpu[label]["values"])


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_every_submission_runs_on_cuda_in_half_precision(variants, precision):
    needs_cuda()
    half = run_all(STEMS, f"tiny-small-{precision}", "cuda", variants)
    assert_all_ok(half, len(STEMS) + 1)
    full = run_all(["task_arithmetic", "ties_merging", "simple_ensemble"], "tiny-small-float32", "cuda", variants)
    for label, result in full.items():
        gap = max_gap(result, half[label])
        print(f"{label}: {precision} - fp32 on cuda max gap {gap:.1f} points")
        assert gap <= 100 * 4 / 48
