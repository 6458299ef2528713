"""Trustworthy results: every number knows what it was computed on, and nothing overwrites or
reuses it by mistake. Each test here is a silent wrong result that today's harness refuses or
keeps apart: caches keyed by content and checked on read, runs fingerprinted by their inputs,
submission names owned by one file, a failed new run shown as failed, and `fbh reproduce`."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import SMALL_TASKS, small_suite_spec
from harness.cli import main
from harness.digests import CorruptFile
from harness.store import SCHEMA_VERSION, Store


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tamper(path, change) -> None:
    """Rewrite a safetensors file with changed tensors but its old metadata (digest included),
    and its old modification time: what a bit flip or a stray script leaves behind."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    stat = os.stat(path)
    tensors = change(load_file(str(path)))
    save_file(tensors, str(path), metadata=metadata)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def write_submission(folder, name: str, method: str, **fields):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "method": method, **fields}))
    return path


# ----------------------------------------------------------------------------- caches keyed by content

@pytest.fixture()
def clip_two_label_columns(private_env):
    """A tiny real CLIP and one dataset with two label columns, read by two suites."""
    import datasets
    from test_families import CLIP_TASKS, tiny_clip
    tiny_clip(private_env)
    for task, classes in CLIP_TASKS.items():
        path = private_env / "data" / task
        dd = datasets.load_from_disk(str(path))
        reversed_labels = {s: [len(classes) - 1 - y for y in dd[s]["label"]] for s in dd}
        dd = datasets.DatasetDict({s: dd[s].add_column("label2", reversed_labels[s]) for s in dd})
        dd.save_to_disk(str(private_env / "data2" / task))
    for name, column in (("clip-a", "label"), ("clip-b", "label2")):
        spec = {"name": name, "family": {"kind": "clip_vision", "base": "../openai-clip-tiny", "heads": "zero_shot",
                                         "experts": {t: f"../experts/{t}" for t in CLIP_TASKS}},
                "tasks": [{"name": t, "dataset": f"../data2/{t}", "validation_split": None, "classes": c,
                           "templates": ["a photo of a {c}."], "label_column": column} for t, c in CLIP_TASKS.items()]}
        (private_env / "suites" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return private_env


def open_family(name: str):
    from harness.families import load_family
    from harness.planner import find_suite
    spec, path = find_suite(name)
    return load_family(spec, path, None, torch.device("cpu"))


def test_evalset_cache_keys_every_task_field(clip_two_label_columns):
    """Two suites on one dataset, labels in different columns: each is scored on its own labels
    (the cache key used to leave out label_column, so the second suite got the first's)."""
    import datasets
    ds = datasets.load_from_disk(str(clip_two_label_columns / "data2" / "sun397"))["test"]
    _, labels_a = open_family("clip-a").eval_data("sun397", "test")
    _, labels_b = open_family("clip-b").eval_data("sun397", "test")
    assert labels_a.tolist() == ds["label"] and labels_b.tolist() == ds["label2"]
    assert labels_a.tolist() != labels_b.tolist()


def test_corrupt_evalset_and_heads_are_refused(clip_two_label_columns):
    family = open_family("clip-a")
    family.eval_data("sun397", "test")
    family.head("sun397")
    from harness.paths import cache_dir
    (evalset,) = (cache_dir() / "evalsets").glob("sun397-test-clean-*.safetensors")
    tamper(evalset, lambda t: {**t, "labels": (t["labels"] + 1) % 3})
    with pytest.raises(CorruptFile) as err:
        open_family("clip-a").eval_data("sun397", "test")
    assert str(evalset) in err.value.render() and "rm" in err.value.render()

    (heads,) = (cache_dir() / "heads").glob("zero-shot-*.safetensors")
    tamper(heads, lambda t: {k: v * 1.01 for k, v in t.items()})
    with pytest.raises(CorruptFile) as err:
        open_family("clip-a").head("sun397")
    assert str(heads) in err.value.render()


def test_corrupt_outputs_cache_is_refused_and_nothing_is_stored(fbh_env, tmp_path):
    """Ensembles read experts' cached logits; a cached file whose logits changed is an error naming
    the file, never a score (the cache used to be keyed by path, size and mtime)."""
    db = tmp_path / "r.duckdb"
    first = write_submission(tmp_path, "ens", "simple_ensemble")
    assert cli("submit", first, "--db", db, "--quiet").exit_code == 0
    from harness.paths import cache_dir
    stored = sorted((cache_dir() / "outputs").rglob("*.safetensors"))
    assert stored
    for path in stored:
        tamper(path, lambda t: {"logits": t["logits"].flip(-1).contiguous()})
    try:
        before = Store(db).counts()
        second = write_submission(tmp_path, "wens", "weighted_ensemble")
        res = cli("submit", second, "--db", db, "--quiet")
        assert res.exit_code == 2 and "cached outputs" in res.output and "Traceback" not in res.output
        assert any(str(path) in res.output for path in stored)
        assert Store(db).counts()["runs"] == before["runs"]
    finally:  # the session's other tests share this cache
        for path in stored:
            path.unlink()


def test_corrupt_zoo_files_stop_the_submit_before_anything_is_stored(fbh_env, tmp_path):
    """Expert weights scaled or heads scaled in the built zoo (mtime kept): an error naming the file."""
    from harness.zoo import zoo_path
    zoo = zoo_path("tiny_vision", small_suite_spec()["family"]["zoo"]["recipe"])
    db = tmp_path / "r.duckdb"
    sub = write_submission(tmp_path, "ta", "task_arithmetic", params={"scaling_factor": 0.3})
    assert cli("submit", sub, "--db", db, "--quiet").exit_code == 0
    before = Store(db).counts()
    for rel in (f"experts/{SMALL_TASKS[1]}/model.safetensors", "heads.safetensors"):
        path = zoo / rel
        original = path.read_bytes()
        tamper(path, lambda t: {k: v * 1.01 if v.is_floating_point() else v for k, v in t.items()})
        try:
            res = cli("submit", sub, "--db", db, "--quiet", "--force")
            assert res.exit_code == 2 and str(path) in res.output and "Traceback" not in res.output, res.output
            assert "fbh zoo build" in res.output and Store(db).counts() == before
        finally:  # the session's other tests share this zoo
            path.write_bytes(original)


# ----------------------------------------------------------------------------- fingerprints

def test_runs_on_other_inputs_are_never_ranked_together(fbh_env, tmp_path):
    db = tmp_path / "r.duckdb"
    sub = write_submission(tmp_path, "ta", "task_arithmetic", params={"scaling_factor": 0.3})
    assert cli("submit", sub, "--db", db, "--quiet").exit_code == 0
    store = Store(db)
    runs = store.query("SELECT * FROM runs WHERE kind != 'published'")
    fingerprints = {r["fingerprint"] for r in runs}
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("fp-")
    assert all(json.loads(r["inputs"])["zoo"].startswith("sha256:") for r in runs)

    # A run of another zoo build (same recipe, other bytes) with a better score: kept, never ranked.
    from harness.store import Run, now
    ours = store.query("SELECT * FROM runs WHERE label = 'ta' AND setting = 'all'")[0]
    rows = store.query("SELECT * FROM results WHERE run_id = ?", [ours["run_id"]])
    store.write_run(Run(run_key="elsewhere", kind="submission", label="ta-elsewhere", submission="ta-elsewhere",
                        suite="tiny-small", fingerprint="fp-0123456789abcdef", started_at=now(), finished_at=now()),
                    [{**r, "value": 99.0} for r in rows])
    board = json.loads(cli("leaderboard", "--suite", "tiny-small", "--db", db, "--format", "json").output)
    assert board["fingerprint"] == ours["fingerprint"]
    assert "ta-elsewhere" not in [e["label"] for e in board["entries"]]
    assert {e["fingerprint"] for e in board["entries"] if e["kind"] != "published"} == {ours["fingerprint"]}
    assert [o["fingerprint"] for o in board["other_fingerprints"]] == ["fp-0123456789abcdef"]
    text = cli("leaderboard", "--suite", "tiny-small", "--db", db).output
    assert "not ranked: 1 run(s) on fingerprint fp-0123456789abcdef" in text

    from harness.site import build
    build(store, tmp_path / "site")
    page = (tmp_path / "site" / "suites" / "tiny-small" / "index.html").read_text()
    assert ours["fingerprint"] in page and "fp-0123456789abcdef" in page and "Runs on other fingerprints" in page
    assert "ta-elsewhere" not in page.split('id="elsewhere"')[0]


def test_fingerprint_ignores_presentation_but_not_what_shapes_results():
    from harness.identity import fingerprint
    from harness.spec import SuiteSpec
    spec = SuiteSpec.model_validate(small_suite_spec())
    inputs = {"zoo": "sha256:" + "0" * 64}
    same = spec.model_copy(update={"title": "renamed", "description": "words", "fusion_budget_seconds": 9.0})
    other = SuiteSpec.model_validate({**small_suite_spec(), "eval_batch_size": 7,
                                      "corruptions": [{"name": "jpeg", "severity": 5}]})
    assert fingerprint(spec, inputs) == fingerprint(same, inputs)
    assert fingerprint(spec, inputs) != fingerprint(other, inputs)
    assert fingerprint(spec, inputs) != fingerprint(spec, {"zoo": "sha256:" + "1" * 64})


def fake_hub_snapshot(cache, repo_id: str, commit: str, files: dict[str, bytes], kind: str = "model") -> None:
    """The HF cache layout a download leaves: blobs behind snapshots/<commit>/, refs/main naming it."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_inputs_are_their_snapshot_commits_and_pins_are_checked(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from harness.errors import FbhError
    from harness.identity import expected_fingerprint, fingerprint, resolve_inputs
    from harness.spec import SuiteSpec
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    a, b = "a" * 40, "b" * 40
    for repo in ("org/base", "org/expert"):
        fake_hub_snapshot(cache, repo, a, {"config.json": b"{}"})
    fake_hub_snapshot(cache, "org/data", a, {"data.parquet": b"x"}, kind="dataset")
    spec = {"name": "hubby", "family": {"kind": "clip_vision", "base": "org/base", "heads": "zero_shot",
                                        "experts": {"t": "org/expert"}},
            "tasks": [{"name": "t", "dataset": "org/data"}]}
    suite = SuiteSpec.model_validate(spec)
    inputs = resolve_inputs(suite, tmp_path / "hubby.yaml", None)
    assert inputs == {"org/base": f"hub:org/base@{a}", "org/data": f"hub:org/data@{a}",
                      "org/expert": f"hub:org/expert@{a}"}
    assert expected_fingerprint(suite) is None  # nothing pinned

    fake_hub_snapshot(cache, "org/expert", b, {"config.json": b"{}"})  # a newer upload moves main
    assert resolve_inputs(suite, tmp_path / "hubby.yaml", None)["org/expert"] == f"hub:org/expert@{b}"
    assert fingerprint(suite, inputs) != fingerprint(suite, resolve_inputs(suite, tmp_path / "hubby.yaml", None))

    pinned = SuiteSpec.model_validate({**spec, "family": {**spec["family"], "revisions": {
        "org/base": a, "org/expert": a}}, "tasks": [{"name": "t", "dataset": "org/data", "revision": a}]})
    assert resolve_inputs(pinned, tmp_path / "hubby.yaml", None) == inputs  # the pin, not main
    assert expected_fingerprint(pinned) == fingerprint(pinned, inputs)
    missing = SuiteSpec.model_validate({**spec, "family": {**spec["family"], "revisions": {"org/base": "c" * 40}}})
    with pytest.raises(FbhError) as err:
        resolve_inputs(missing, tmp_path / "hubby.yaml", None)
    assert "c" * 40 in err.value.render() and "family.base" in err.value.render()


# ----------------------------------------------------------------------------- names and supersession

def test_a_submission_name_belongs_to_one_file(fbh_env, tmp_path, monkeypatch):
    folder = tmp_path / "subs"
    folder.mkdir()
    monkeypatch.setenv("FBH_SUBMISSIONS_DIR", str(folder))
    first = write_submission(folder, "mine", "task_arithmetic")
    (folder / "other.yaml").write_text(yaml.safe_dump({"name": "mine", "method": "ties_merging",
                                                       "description": "takes over the entry"}))
    res = cli("validate", folder / "other.yaml")
    assert res.exit_code == 2 and str(first) in res.output and "field 'name'" in res.output
    db = tmp_path / "r.duckdb"
    res = cli("submit", folder / "other.yaml", "--db", db)
    assert res.exit_code == 2 and str(first) in res.output and not db.exists()

    # Outside the folder too: the database remembers which file a name came from.
    (folder / "other.yaml").unlink()
    assert cli("submit", first, "--db", db, "--quiet").exit_code == 0
    stray = tmp_path / "stray.yaml"
    stray.write_text(yaml.safe_dump({"name": "mine", "method": "simple_average"}))
    monkeypatch.setenv("FBH_SUBMISSIONS_DIR", str(tmp_path / "empty"))
    before = Store(db).counts()
    res = cli("submit", stray, "--db", db)
    assert res.exit_code == 2 and str(first) in res.output and Store(db).counts() == before


def test_a_changed_submission_whose_run_fails_shows_the_failure(fbh_env, tmp_path, monkeypatch):
    suites = tmp_path / "suites"
    suites.mkdir()
    spec = small_suite_spec("tiny-budget")
    (suites / "tiny-budget.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    db = tmp_path / "r.duckdb"
    sub = write_submission(tmp_path, "ta", "task_arithmetic", params={"scaling_factor": 0.3}, description="v1")
    assert cli("submit", sub, "--db", db, "--quiet").exit_code == 0
    # The new version cannot fuse within the suite's budget (which shapes no result, so the
    # fingerprint stays): its run fails, and the leaderboard says so instead of showing v1's scores.
    (suites / "tiny-budget.yaml").write_text(yaml.safe_dump({**spec, "fusion_budget_seconds": 1e-9}))
    write_submission(tmp_path, "ta", "task_arithmetic", params={"scaling_factor": 0.5}, description="v2")
    assert cli("submit", sub, "--db", db, "--quiet").exit_code == 1
    board = json.loads(cli("leaderboard", "--suite", "tiny-budget", "--db", db, "--format", "json").output)
    (ta,) = [e for e in board["entries"] if e["label"] == "ta"]
    assert ta["status"] == "failed" and ta["scores"] == {} and "budget" in ta["error"]
    store = Store(db)
    old = store.query("SELECT * FROM runs WHERE label = 'ta' AND setting = 'all' AND status = 'ok'")
    assert len(old) == 1 and old[0]["superseded"]  # kept, marked
    from harness.site import build
    build(store, tmp_path / "site")
    page = (tmp_path / "site" / "suites" / "tiny-budget" / "index.html").read_text()
    failed = page.split('id="failed"')[1]
    assert "budget" in failed and not (tmp_path / "site" / "suites" / "tiny-budget" / "submissions" / "ta.html").exists()


# ----------------------------------------------------------------------------- reproduce

def test_reproduce_a_stored_run(fbh_env, tmp_path):
    db = tmp_path / "r.duckdb"
    sub = write_submission(tmp_path, "ta", "task_arithmetic", params={"scaling_factor": 0.3})
    assert cli("submit", sub, "--db", db, "--quiet").exit_code == 0
    res = cli("reproduce", "ta", "--suite", "tiny-small", "--db", db)
    assert res.exit_code == 0, res.output
    assert res.output.count("same ") == 2 and "largest difference 0 " in res.output  # settings all, two-seen
    stl = Store(db).query("SELECT run_id FROM runs WHERE label = 'STL'")[0]["run_id"]
    res = cli("reproduce", stl, "--db", db)  # every expert's logits computed again, not read from the cache
    assert res.exit_code == 0 and "same " in res.output, res.output

    with Store(db).transaction() as con:
        con.execute("UPDATE results SET value = value + 0.5 WHERE run_id = ? AND task = ? AND condition = 'clean'",
                    [stl, SMALL_TASKS[0]])
    res = cli("reproduce", stl, "--db", db, "--tolerance", "0.1")
    assert res.exit_code == 1 and "MOVED" in res.output and SMALL_TASKS[0] in res.output


# The schema fbh 0.1 databases were written with (schema_version 1), as it was.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS submissions (
    name VARCHAR PRIMARY KEY,
    method VARCHAR NOT NULL,
    description VARCHAR,
    authors VARCHAR,
    url VARCHAR,
    spec JSON NOT NULL,
    source_path VARCHAR,
    spec_hash VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS suites (
    name VARCHAR PRIMARY KEY,
    title VARCHAR,
    description VARCHAR,
    spec JSON NOT NULL,
    spec_hash VARCHAR NOT NULL,
    task_names JSON NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    run_key VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- submission | reference | published
    label VARCHAR NOT NULL,           -- submission name, or pretrained / STL / MTL / published label
    submission VARCHAR,
    suite VARCHAR NOT NULL,
    setting VARCHAR NOT NULL,         -- 'all' or a generalization split name
    method VARCHAR,
    status VARCHAR NOT NULL,          -- ok | failed
    error VARCHAR,
    params JSON,                      -- the hyperparameters used (chosen grid values included)
    grid JSON,                        -- validation scores of every grid point, if a grid was searched
    data_access VARCHAR,
    output_kind VARCHAR,
    n_parameters BIGINT,
    seed INTEGER,
    device VARCHAR,
    code_version VARCHAR,
    git_commit VARCHAR,
    packages JSON,
    source VARCHAR,                   -- for published rows: where the numbers come from
    tolerance DOUBLE,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    fusion_seconds DOUBLE,
    eval_seconds DOUBLE,
    peak_memory_bytes BIGINT
);
CREATE TABLE IF NOT EXISTS results (
    run_id VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    task_split VARCHAR NOT NULL,      -- seen | unseen
    condition VARCHAR NOT NULL,       -- clean | corruption name
    severity INTEGER,
    metric VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    n INTEGER,
    ci_low DOUBLE,
    ci_high DOUBLE
);
CREATE INDEX IF NOT EXISTS runs_key ON runs (run_key);
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
"""


def test_old_databases_migrate_and_newer_ones_are_refused(tmp_path):
    import duckdb
    from harness.errors import FbhError
    path = tmp_path / "r.duckdb"
    con = duckdb.connect(str(path))
    con.execute(SCHEMA_V1)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs (run_id, run_key, kind, label, suite, setting, status) "
                "VALUES ('r1', 'k1', 'submission', 'old', 's', 'all', 'ok')")
    con.close()
    store = Store(path)
    assert {"fingerprint", "inputs", "job", "superseded"} <= {r["column_name"] for r in store.query("DESCRIBE runs")}
    assert "replicates" in {r["column_name"] for r in store.query("DESCRIBE results")}
    assert store.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(SCHEMA_VERSION)
    assert store.completed_keys(["k1"]) == {"k1"}  # old runs kept, not superseded, fingerprint unknown
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(FbhError, match="newer"):
        Store(path)
