"""Fusion runs in a process of its own that holds only what the method declared (harness.isolation).

The methods defined here are module-level functions, so the fusion process imports them by name
as it imports any method; each is registered only for the test that needs it.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import Field

from harness import registry
from harness.api import FusionContext, Params, method
from harness.cli import main
from harness.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------- bit-identical

def in_process_context(handle, info, tasks, seed):
    """The context fusion ran in before it moved to its own process: everything in the driver."""
    family, spec = handle.family, handle.spec

    def data(task, split):
        t = spec.task(task)
        return family.eval_data(task, {"train": t.train_split, "validation": t.validation_split, "test": t.split}[split])

    return FusionContext(tasks=tasks, load_base=family.base_state, load_expert=family.expert_state,
                         build_module=family.build, logits_fn=family.logits, data_fn=data, data_access=info.data,
                         seed=seed, device=torch.device("cpu"))


def tensors_of(fused) -> list[torch.Tensor]:
    from harness.api import Ensemble
    if isinstance(fused, Ensemble):
        return [t for m in fused.members for t in tensors_of(m)] + [torch.tensor(list(fused.weights or []))]
    state = fused.state_dict() if isinstance(fused, torch.nn.Module) else fused
    return [state[k] for k in state]


SAME_IN_BOTH = [("task_arithmetic", {"scaling_factor": 0.3}), ("dare", {"sparsity_ratio": 0.5}),
                ("regmean", {"num_regmean_examples": 16, "batch_size": 8}),
                ("adamerging_taskwise", {"max_steps": 3, "batch_size": 8}),
                ("weighted_ensemble", {}), ("we_moe", {"max_steps": 2, "batch_size": 4})]


@pytest.mark.parametrize("name,params", SAME_IN_BOTH, ids=[n for n, _ in SAME_IN_BOTH])
def test_fused_in_its_own_process_is_bit_identical_to_in_process(fbh_env, name, params):
    from harness.isolation import isolated_fuse
    from harness.runner import fuse, open_suite
    handle = open_suite("tiny-small", "cpu", progress=lambda m: None)
    info = registry.get(name)
    validated = info.validate_params(params)
    tasks = handle.spec.task_names
    isolated = isolated_fuse(handle, tasks, info, validated, 7, torch.device("cpu"))
    here = fuse(info, in_process_context(handle, info, tasks, 7), validated)
    a, b = tensors_of(isolated.value), tensors_of(here)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    # only a module of the method's own comes back as code, and is therefore unverified
    assert isolated.verified == (name != "we_moe")


def test_fusion_kit_holds_no_path_to_the_suite_files(fbh_env):
    import pickle
    from harness.paths import cache_dir
    from harness.runner import open_suite
    family = open_suite("tiny-small", "cpu", progress=lambda m: None).family
    kit = family.fusion_kit()
    assert str(cache_dir()).encode() not in pickle.dumps(kit)
    with pytest.raises(PermissionError, match="cannot open"):
        kit.eval_data("digits", "test")
    x = family.eval_data("digits", "test")[0][:4]
    model = kit.build(family.base_state())
    assert torch.equal(kit.logits(model, "digits", x), family.logits(family.build(family.base_state()), "digits", x))


# ----------------------------------------------------------------------------- hostile methods

class SnoopParams(Params):
    report: str = Field(description="where the method writes what it found (the test reads it)")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _snoop(ctx, params: SnoopParams):
    """Tries every way it can think of to reach the test split, writes what it got, returns the base."""
    import gc
    import os
    import sys
    found: dict = {"errors": {}, "tasks": ctx.tasks}

    def attempt(name, fn):
        try:
            found[name] = repr(fn())[:200]
        except Exception as exc:
            found["errors"][name] = f"{type(exc).__name__}: {exc}"[:200]

    for task in ctx.tasks:
        attempt(f"batches:{task}:test", lambda: next(ctx.batches(task, "test")))
        attempt(f"data_fn:{task}:test", lambda: ctx.data_fn(task, "test"))
        attempt(f"kit:{task}:test", lambda: ctx.logits_fn.__self__.eval_data(task, "test"))
    from harness.paths import cache_dir
    found["cache_files"] = [str(p) for p in cache_dir().rglob("*")] if cache_dir().exists() else []
    found["env"] = {k: v for k, v in os.environ.items() if k.startswith(("FBH_", "HF_"))}
    import harness.runner
    found["open_suites"] = harness.runner._open_suite.cache_info().currsize
    attempt("open_suite", lambda: harness.runner.open_suite("tiny-small", "cpu", progress=lambda m: None))
    found["harness_modules"] = sorted(m for m in sys.modules if m.startswith("harness"))
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for m in gc.get_objects():  # tensors held inside modules and dicts the collector does not list
        if isinstance(m, torch.nn.Module):
            tensors += list(m.state_dict().values())
    found["digests"] = sorted({_digest(t) for t in tensors})
    if ctx.data_access != "none":
        found["digests"] += [_digest(x) for t in ctx.tasks for x, _ in ctx.batches(t, "test", batch_size=10**6)]
        found["labels_seen"] = [y is not None for t in ctx.tasks for _, y in ctx.batches(t, "test")]
    with open(params.report, "w") as f:
        json.dump(found, f)
    return ctx.base


@pytest.fixture()
def snoops():
    method("test_snoop_none", params=SnoopParams, category="merging", data="none")(_snoop)
    method("test_snoop_unlabeled", params=SnoopParams, category="merging", data="unlabeled_test")(_snoop)
    yield
    for name in ("test_snoop_none", "test_snoop_unlabeled"):
        registry._REGISTRY.pop(name, None)


def test_hostile_method_reaches_no_test_data_and_never_a_label(fbh_env, write_yaml, tmp_path, snoops):
    from harness.runner import open_suite
    family = open_suite("tiny-small", "cpu", progress=lambda m: None).family
    tasks = ["digits", "shapes", "textures"]
    test_sets = {t: family.eval_data(t, "test") for t in tasks}
    labels = {_digest(y) for _, y in test_sets.values()}
    inputs = {_digest(x) for x, _ in test_sets.values()}
    db = tmp_path / "snoop.duckdb"
    reports = {}
    for name in ("test_snoop_none", "test_snoop_unlabeled"):
        reports[name] = tmp_path / f"{name}.json"
        sub = write_yaml(f"{name}.yaml", {"name": name.replace("_", "-"), "method": name,
                                          "params": {"report": str(reports[name])}})
        res = CliRunner().invoke(main, ["submit", str(sub), "--db", str(db)])
        assert res.exit_code == 0, res.output
    none = json.loads(reports["test_snoop_none"].read_text())
    # each setting's run writes the report; the last one's tasks are in it
    assert set(none["errors"]) >= {f"{k}:{t}:test" for k in ("batches", "data_fn", "kit") for t in none["tasks"]} | {
        "open_suite"}
    assert "cannot open" in none["errors"]["kit:digits:test"]
    assert none["cache_files"] == [] and none["open_suites"] == 0
    assert not any(str(fbh_env) in v for v in none["env"].values())
    assert not set(none["digests"]) & (labels | inputs)
    unlabeled = json.loads(reports["test_snoop_unlabeled"].read_text())
    held = {_digest(test_sets[t][0]) for t in unlabeled["tasks"]}
    assert held <= set(unlabeled["digests"])  # the scan finds what the process holds ...
    assert not set(unlabeled["digests"]) & labels  # ... and no label is among it
    assert unlabeled["labels_seen"] and not any(unlabeled["labels_seen"])
    runs = Store(db).query("SELECT label, data_access, data_access_verified FROM runs WHERE kind = 'submission'")
    assert {(r["label"], r["data_access"], r["data_access_verified"]) for r in runs} >= {
        ("test-snoop-none", "none", True), ("test-snoop-unlabeled", "unlabeled_test:all/task", True)}


# ----------------------------------------------------------------------------- budget

def _sleeps(ctx, params):
    time.sleep(120)
    return ctx.base


@pytest.fixture()
def sleeper():
    method("test_sleeps", category="merging")(_sleeps)
    yield
    registry._REGISTRY.pop("test_sleeps", None)


def test_fusion_is_ended_at_the_budget_and_other_runs_go_on(fbh_env, write_yaml, tmp_path, monkeypatch, sleeper):
    from conftest import small_suite_spec
    suites = tmp_path / "budget-suites"
    suites.mkdir()
    spec = small_suite_spec()
    spec.update(name="tiny-budget", fusion_budget_seconds=2, generalization=[])
    suite_file = suites / "tiny-budget.yaml"
    suite_file.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    db = tmp_path / "budget.duckdb"
    sub = write_yaml("sleeps.yaml", {"name": "sleeps", "method": "test_sleeps"})
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-budget", "--db", str(db)])
    assert time.perf_counter() - t0 < 60, "the budget did not end the fusion"
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    runs = Store(db).query("SELECT kind, status, error, fusion_seconds FROM runs")
    [failed] = [r for r in runs if r["kind"] == "submission"]
    assert failed["status"] == "failed"
    for part in (str(suite_file), "fusion_budget_seconds", "over the suite's budget of 2 s", "fix:"):
        assert part in failed["error"], failed["error"]
    assert {r["status"] for r in runs if r["kind"] == "reference"} == {"ok"}
    ok = write_yaml("avg.yaml", {"name": "avg", "method": "simple_average"})
    res = CliRunner().invoke(main, ["submit", str(ok), "--suite", "tiny-budget", "--db", str(db)])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- marker

def test_unverified_runs_are_marked_on_the_leaderboard_and_the_site(tmp_path):
    from datetime import datetime
    from harness.leaderboard import render, table
    from harness.site import build
    from harness.store import Run
    from conftest import small_suite_spec
    store = Store(tmp_path / "marks.duckdb")
    store.upsert_suite(small_suite_spec("marks"), "spec-hash")
    for label, verified in (("tensors", True), ("module", False)):
        store.write_run(Run(run_key=f"marks/{label}", kind="submission", label=label, suite="marks",
                            data_access="none", data_access_verified=verified, finished_at=datetime(2026, 1, 1)),
                        [{"task": "digits", "task_split": "seen", "condition": "clean", "severity": None,
                          "metric": "accuracy", "value": 50.0, "n": 10}])
    text = render(*table(store, "marks"), "text")
    assert "module (data access not verified)" in text and "tensors (data access" not in text
    build(store, tmp_path / "site")
    pages = "".join(p.read_text() for p in (tmp_path / "site").rglob("*.html"))
    assert "none (data access not verified)" in pages
    assert "data access not verified: the fused result is code" in pages  # the entry page says why
