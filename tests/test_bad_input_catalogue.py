"""A catalogue of malformed suites and submissions: each gives one clear error naming the
file, the field and the fix; no traceback; exit code 2; the database is unchanged."""

import copy
import hashlib
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main
from conftest import small_suite_spec

SECONDS = 60  # a refusal is immediate; this bound only catches hangs and unbounded work on a loaded machine
GOOD_SUB = {"name": "ok-sub", "method": "task_arithmetic", "params": {"scaling_factor": 0.3}}


def sub_with(**changes):
    spec = copy.deepcopy(GOOD_SUB)
    for key, value in changes.items():
        if value is KeyError:
            spec.pop(key)
        else:
            spec[key] = value
    return spec


def suite_with(edit):
    spec = small_suite_spec("tiny-bad")
    edit(spec)
    return spec


# (case id, file content (dict or raw text or bytes), field expected in the message or None for file-level)
SUBMISSIONS = [
    ("yaml-syntax", "name: x\nmethod: [unclosed\n", None),
    ("top-level-list", "- a\n- b\n", None),
    ("empty-file", "", None),
    ("not-utf8", b"name: \xff\xfe\n", None),
    ("huge-file", "name: x\n" + "# padding\n" * 120_000, None),
    ("missing-name", sub_with(name=KeyError), "name"),
    ("missing-method", sub_with(method=KeyError), "method"),
    ("unknown-method", sub_with(method="task_arithmatic"), "method"),
    ("unknown-top-key", sub_with(hyperparams={"a": 1}), "hyperparams"),
    ("name-with-spaces", sub_with(name="My Method"), "name"),
    ("name-path-traversal", sub_with(name="../../etc/passwd"), "name"),
    ("params-unknown-key", sub_with(params={"scale": 0.3}), "params.scale"),
    ("params-wrong-type", sub_with(params={"scaling_factor": "0.3"}), "params.scaling_factor"),
    ("params-out-of-range", sub_with(params={"scaling_factor": -1.0}), "params.scaling_factor"),
    ("params-huge-value", sub_with(params={"scaling_factor": 1e300}), "params.scaling_factor"),
    ("params-not-mapping", sub_with(params=3), "params"),
    ("grid-empty", sub_with(params={}, grid={"scaling_factor": []}), "grid"),
    ("grid-and-params", sub_with(grid={"scaling_factor": [0.1]}), "(top level)"),
    ("grid-wrong-type", sub_with(params={}, grid={"scaling_factor": ["big"]}), "params/grid.scaling_factor"),
    ("grid-too-many", sub_with(params={}, grid={"scaling_factor": [0.01 * i for i in range(65)]}), "grid"),
    ("seed-negative", sub_with(seed=-1), "seed"),
    ("seed-huge", sub_with(seed=2 ** 40), "seed"),
    ("url-javascript", sub_with(url="javascript:alert(1)"), "url"),
    ("description-too-long", sub_with(description="x" * 5000), "description"),
    ("unknown-suite", sub_with(suites=["no-such-suite"]), "suites"),
    ("ties-bad-enum", sub_with(method="ties_merging", params={"disjoint_merge": "median"}),
     "params.disjoint_merge"),
    # YAML that safe_load accepts but a spec never needs: refused before it can cost memory or time.
    ("yaml-alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(12)) + "name: x\nmethod: task_arithmetic\n", None),
    ("yaml-deep-nesting", "name: x\nmethod: task_arithmetic\nparams: " + "[" * 5000 + "]" * 5000 + "\n", None),
    ("yaml-duplicate-key", "name: ok-sub\nmethod: task_arithmetic\nmethod: ties_merging\n", None),
    ("yaml-binary-tag", "name: ok-sub\nmethod: !!binary dGFza19hcml0aG1ldGlj\n", None),
    ("yaml-timestamp", "name: ok-sub\nmethod: task_arithmetic\ndescription: 2024-01-01\n", None),
    ("yaml-python-tag", "name: ok-sub\nmethod: !!python/name:os.system task_arithmetic\n", None),
    ("seed-yaml-bool", "name: ok-sub\nmethod: task_arithmetic\nseed: on\n", "seed"),
    ("seed-string", sub_with(seed="7"), "seed"),
    ("params-inf", "name: ok-sub\nmethod: task_arithmetic\nparams: {scaling_factor: .inf}\n", "params.scaling_factor"),
    ("params-nan", "name: ok-sub\nmethod: task_arithmetic\nparams: {scaling_factor: .nan}\n", "params.scaling_factor"),
    ("grid-nan", "name: ok-sub\nmethod: task_arithmetic\ngrid: {scaling_factor: [0.3, .nan]}\n",
     "params/grid.scaling_factor"),
    # Work is bounded before it starts: grids by their product (64^3 queued 524k fusions; 64^5 was a
    # MemoryError), size-like method params by their ranges.
    ("grid-product-64x64x64", sub_with(method="ties_merging", params={}, grid={
        "scaling_factor": [0.01 * i for i in range(64)], "top_k": [(i + 1) / 64 for i in range(64)],
        "p": list(range(64))}), "grid"),
    ("grid-product-64-to-the-5", sub_with(params={}, grid={f"p{i}": list(range(64)) for i in range(5)}), "grid"),
    ("grid-too-many-keys", sub_with(params={}, grid={f"p{i}": [1] for i in range(9)}), "grid"),
    ("grid-repeated-value", sub_with(params={}, grid={"scaling_factor": [0.3, 0.5, 0.3]}), "grid"),
    ("suites-list-huge", sub_with(suites=["tiny-small"] * 300), "suites"),
    ("we-moe-steps-huge", sub_with(method="we_moe", params={"max_steps": 10 ** 9}), "params.max_steps"),
    ("smile-rank-huge", sub_with(method="smile_upscaling", params={"k": 10 ** 9}), "params.k"),
    ("depth-indices-huge", sub_with(method="depth_upscaling", params={"layer_indices": [0] * 5000}),
     "params.layer_indices"),
    # Invisible characters that would disguise what the site and the CLI show.
    ("description-bidi-override", sub_with(description="safe \u202egnp.exe"), "description"),
    ("authors-bidi-isolate", sub_with(authors="Alice \u2066Mallory\u2069"), "authors"),
    ("description-ansi-escape", sub_with(description="ok \x1b[2J\x1b[31mFAKE"), "description"),
    ("params-key-zero-width", sub_with(params={"scaling\u200bfactor": 0.3}), "params.scaling\u200bfactor"),
]


def _del(path):
    def edit(spec):
        node = spec
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return edit


def _set(path, value):
    def edit(spec):
        node = spec
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


SUITES = [
    ("suite-missing-family", _del(["family"]), "family"),
    ("suite-unknown-family", _set(["family", "kind"], "llama_vision"), "family.kind"),
    ("suite-no-tasks", _set(["tasks"], []), "tasks"),
    ("suite-duplicate-tasks", lambda s: s["tasks"].append(dict(s["tasks"][0])), "(top level)"),
    ("suite-unknown-corruption", _set(["corruptions", 0, "name"], "fog"), "corruptions[0].name"),
    ("suite-severity-range", _set(["corruptions", 0, "severity"], 6), "corruptions[0].severity"),
    ("suite-generalization-unknown", _set(["generalization", 0, "unseen"], ["nope"]), "(top level)"),
    ("suite-split-named-all", _set(["generalization", 0, "name"], "all"), "generalization[0].name"),
    ("suite-duplicate-split", lambda s: s["generalization"].append(dict(s["generalization"][0])),
     "generalization[1].name"),
    ("suite-duplicate-corruption", lambda s: s["corruptions"].append(dict(s["corruptions"][0])), "corruptions[2]"),
    ("suite-missing-expert", lambda s: s["family"]["experts"].pop("shapes"), "(top level)"),
    ("suite-unknown-builder", _set(["family", "zoo", "builder"], "giant_vision"), "family.zoo.builder"),
    ("suite-unknown-recipe-key", _set(["family", "zoo", "recipe", "epochs"], 3), "family.zoo.recipe"),
    ("suite-zoo-digest-not-sha256", _set(["family", "zoo", "digest"], "md5:0123"), "family.zoo.digest"),
    ("suite-path-escapes-repo", _set(["tasks", 0, "dataset"], "../../../../etc"), "tasks[0].dataset"),
    ("suite-zoo-escapes", _set(["family", "base"], "zoo://../../elsewhere"), "family.base"),
    ("suite-mtl-missing", _del(["references", "mtl"]), "(top level)"),
    ("suite-batch-size-zero", _set(["eval_batch_size"], 0), "eval_batch_size"),
    ("suite-bad-metric", _set(["tasks", 0, "metric"], "vibes"), "tasks[0].metric"),
    ("suite-published-bad-tolerance", _set(["references", "published", 0, "tolerance"], -1),
     "references.published[0].tolerance"),
    ("suite-published-nan", _set(["references", "published", 0, "values", "digits"], float("nan")),
     "references.published[0].values.digits"),
    ("suite-published-inf", _set(["references", "published", 0, "values", "digits"], float("inf")),
     "references.published[0].values.digits"),
    ("suite-severity-bool", _set(["corruptions", 0, "severity"], True), "corruptions[0].severity"),
    ("suite-published-unknown-task", _set(["references", "published", 0, "values", "nope"], 1.0),
     "references.published[0].values"),
    ("suite-name-not-its-file-name", _set(["name"], "tiny-other"), "name"),
    ("suite-published-undeclared-metric", _set(["references", "published", 0, "extra_values"],
                                               {"digits": {"miou": 1.0}}), "references.published[0].extra_values"),
    ("suite-published-unknown-split", _set(["references", "published", 0, "split"], "nope"),
     "references.published[0].split"),
    ("suite-published-unknown-condition", _set(["references", "published", 0, "condition"], "fog"),
     "references.published[0].condition"),
    # Typed zoo recipes: refused before any build, naming the recipe key.
    ("suite-recipe-not-an-int", _set(["family", "zoo", "recipe", "n_test"], "many"), "family.zoo.recipe.n_test"),
    ("suite-recipe-huge", _set(["family", "zoo", "recipe", "n_train"], 10 ** 9), "family.zoo.recipe.n_train"),
    ("suite-recipe-negative-steps", _set(["family", "zoo", "recipe", "finetune_steps"], -5),
     "family.zoo.recipe.finetune_steps"),
    ("suite-recipe-unknown-task", _set(["family", "zoo", "recipe", "tasks"], ["digits", "nope"]),
     "family.zoo.recipe.tasks[1]"),
    ("suite-recipe-heads-do-not-divide", _set(["family", "zoo", "recipe", "hidden_size"], 33),
     "family.zoo.recipe.num_heads"),
    ("suite-recipe-logit-scale-word", _set(["family", "zoo", "recipe", "logit_scale"], "auto"),
     "family.zoo.recipe.logit_scale"),
    ("suite-recipe-bool-for-int", _set(["family", "zoo", "recipe", "seed"], True), "family.zoo.recipe.seed"),
    # Every local input is the kind of thing its field names, checked before anything is written.
    ("suite-dataset-is-a-file", _set(["tasks", 0, "dataset"], "/etc/passwd"), "tasks[0].dataset"),
    ("suite-base-is-etc", _set(["family", "base"], "/etc"), "family.base"),
    ("suite-mtl-is-etc", _set(["references", "mtl"], "/etc"), "references.mtl"),
    ("suite-heads-is-a-folder", _set(["family", "heads"], "/etc"), "family.heads"),
    # Caps on sizes and repeats.
    ("suite-too-many-tasks", _set(["tasks"], [{"name": f"t{i}", "dataset": "zoo://x"} for i in range(65)]), "tasks"),
    ("suite-too-many-templates", _set(["tasks", 0, "templates"], ["a photo of {c}"] * 1001), "tasks[0].templates"),
    ("suite-computed-twice", _set(["references", "computed"], ["stl", "stl"]), "references.computed"),
    ("suite-prompts-product", lambda s: s["tasks"][0].update(classes=[f"c{i}" for i in range(2000)],
                                                             templates=[f"{{c}} {i}" for i in range(600)]),
     "tasks[0]"),
    ("suite-too-many-splits", _set(["generalization"], [{"name": f"s{i}", "seen": ["digits"], "unseen": ["shapes"]}
                                                        for i in range(17)]), "generalization"),
    ("suite-description-huge", _set(["description"], "x" * 5000), "description"),
    ("suite-budget-huge", _set(["fusion_budget_seconds"], 1e12), "fusion_budget_seconds"),
    # Invisible characters in what the site shows.
    ("suite-title-bidi", _set(["title"], "tiny \u202eevil"), "title"),
    ("suite-published-label-bidi", _set(["references", "published", 0, "label"], "Paper \u2067row"),
     "references.published[0].label"),
]


def db_fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def check_error(result, file_name, field, started=None):
    """One clear error: exit 2, no traceback, the file, the field and a fix; within SECONDS of `started`."""
    if started is not None:
        assert time.monotonic() - started < SECONDS, f"took {time.monotonic() - started:.0f} s"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output
    assert text.count("error:") == 1, text
    assert file_name in text, text
    assert "fix:" in text, text
    if field is not None:
        assert f"field '{field}'" in text, text


@pytest.fixture()
def seeded_db(fbh_env, tmp_path):
    """A DB with a submission stored, to prove bad input never changes it."""
    from harness.store import Run, Store
    db = tmp_path / "keep.duckdb"
    Store(db).write_run(Run(run_key="k", kind="submission", label="kept", suite="tiny-small"),
                        [{"task": "digits", "task_split": "seen", "condition": "clean", "severity": None,
                          "metric": "accuracy", "value": 12.5, "n": 8, "ci_low": 10.0, "ci_high": 15.0}])
    return db


@pytest.mark.parametrize("case,content,field", SUBMISSIONS, ids=[c[0] for c in SUBMISSIONS])
def test_bad_submission(case, content, field, tmp_path, seeded_db):
    path = tmp_path / f"{case}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    before = db_fingerprint(seeded_db)
    started = time.monotonic()
    check_error(CliRunner().invoke(main, ["validate", str(path)]), path.name, field, started)
    started = time.monotonic()
    check_error(CliRunner().invoke(main, ["submit", str(path), "--db", str(seeded_db)]), path.name, field, started)
    assert db_fingerprint(seeded_db) == before


@pytest.mark.parametrize("case,edit,field", SUITES, ids=[c[0] for c in SUITES])
def test_bad_suite(case, edit, field, fbh_env, tmp_path, seeded_db, monkeypatch):
    suites = tmp_path / "suites"
    suites.mkdir()
    path = suites / "tiny-bad.yaml"
    path.write_text(yaml.safe_dump(suite_with(edit)))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    started = time.monotonic()
    check_error(CliRunner().invoke(main, ["validate", str(path)]), path.name, field, started)
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    before = db_fingerprint(seeded_db)
    started = time.monotonic()
    check_error(CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-bad", "--db", str(seeded_db)]),
                path.name, field, started)
    assert db_fingerprint(seeded_db) == before


def test_a_folder_that_is_no_model_is_refused_before_anything_is_hashed_or_written(tmp_path, seeded_db, fbh_env,
                                                                                  monkeypatch):
    """A reference to a huge folder (/, /etc, a home directory) is not read through to fingerprint it."""
    import harness.identity
    monkeypatch.setattr(harness.identity, "MAX_INPUT_FILES", 5)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):
        (big / f"f{i}").write_text("x")
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "tiny-bad.yaml").write_text(yaml.safe_dump(suite_with(_set(["family", "processor"], str(big)))))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    before = db_fingerprint(seeded_db)
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-bad", "--db", str(seeded_db)])
    check_error(res, "tiny-bad.yaml", "family.processor")
    assert "not a model folder" in res.output and db_fingerprint(seeded_db) == before


def test_cuda_on_a_machine_without_one_changes_nothing(tmp_path, seeded_db, fbh_env):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    before = db_fingerprint(seeded_db)
    res = CliRunner().invoke(main, ["submit", str(sub), "--db", str(seeded_db), "--device", "cuda"])
    assert res.exit_code == 2 and "--device" in res.output and "Traceback" not in res.output
    assert db_fingerprint(seeded_db) == before


def test_missing_files_and_unknown_suite(tmp_path, seeded_db, fbh_env):
    res = CliRunner().invoke(main, ["submit", str(tmp_path / "nope.yaml"), "--db", str(seeded_db)])
    check_error(res, "nope.yaml", None)
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "nope", "--db", str(seeded_db)])
    assert res.exit_code == 2 and "unknown suite 'nope'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["leaderboard", "--suite", "tiny-small", "--db", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "fix:" in res.output


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 40)


def _sqlite(path):
    import sqlite3
    con = sqlite3.connect(str(path))
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()


def _other_duckdb(path):
    import duckdb
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE orders (id INTEGER)")
    con.close()


def _truncated(path):
    from harness.store import Store
    Store(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _fifo_db(path):
    import os
    os.mkfifo(path)  # DuckDB would wait on it for ever


BAD_DATABASES = [("a-folder", lambda p: p.mkdir()), ("a-fifo", _fifo_db), ("random-bytes", _random_bytes),
                 ("empty-file", lambda p: p.write_bytes(b"")), ("sqlite-file", _sqlite),
                 ("another-programs-duckdb", _other_duckdb), ("truncated", _truncated)]


@pytest.mark.parametrize("case,make", BAD_DATABASES, ids=[c[0] for c in BAD_DATABASES])
def test_a_bad_results_database_is_one_clear_error(case, make, tmp_path, fbh_env):
    """Never a traceback or a silent write into someone else's file: one message with the file and the fix."""
    import time
    db = tmp_path / "results.duckdb"
    make(db)
    before = db_fingerprint(db) if db.is_file() else None
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    for args in (["leaderboard", "--suite", "tiny-small"], ["submit", str(sub)], ["site", "build", "--out",
                                                                                   str(tmp_path / "site")]):
        started = time.monotonic()
        res = CliRunner().invoke(main, [*args, "--db", str(db)])
        assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
        assert str(db) in res.output and "fix:" in res.output and time.monotonic() - started < 60
    if db.is_file():
        assert db_fingerprint(db) == before


def test_a_cached_resubmit_works_on_a_read_only_database(tmp_path, fbh_env):
    import os
    import stat
    db = tmp_path / "ro" / "results.duckdb"
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    assert CliRunner().invoke(main, ["submit", str(sub), "--db", str(db), "--quiet"]).exit_code == 0
    before = db_fingerprint(db)
    os.chmod(db, stat.S_IRUSR)
    os.chmod(db.parent, stat.S_IRUSR | stat.S_IXUSR)
    try:
        res = CliRunner().invoke(main, ["submit", str(sub), "--db", str(db), "--quiet"])
        assert res.exit_code == 0 and res.output.count("cached") == 5, res.output
        assert db_fingerprint(db) == before
    finally:
        os.chmod(db.parent, stat.S_IRWXU)
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)


# ----------------------------------------------------------------------------- local inputs of the wrong kind

def _pickle_file(tmp):
    path = tmp / "expert.bin"
    path.write_bytes(b"\x80\x04\x95 pickled bytes")
    return str(path)


def _folder_with_only_pickle_weights(tmp):
    folder = tmp / "expert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")
    return str(folder)


def _folder_without_config(tmp):
    folder = tmp / "expert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _folder_that_is_no_dataset(tmp):
    folder = tmp / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("a,b\n")
    return str(folder)


def _heads_as_pickle(tmp):
    path = tmp / "heads.pt"
    path.write_bytes(b"\x80\x04\x95")
    return str(path)


def _symlink_loop(tmp):
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    return str(tmp / "loop-a")


def _relative_symlink_loop(tmp):
    (tmp / "suites" / "loop-a").symlink_to("loop-b")
    (tmp / "suites" / "loop-b").symlink_to("loop-a")
    return "./loop-a"


def _fifo(tmp):
    import os
    os.mkfifo(tmp / "heads.safetensors")  # reading it would wait for ever
    return str(tmp / "heads.safetensors")


LOCAL_INPUTS = [("pickle-expert-file", ["family", "experts", "shapes"], _pickle_file, "pickle"),
                ("expert-with-only-pytorch-model-bin", ["family", "experts", "shapes"],
                 _folder_with_only_pickle_weights, "pickle"),
                ("expert-without-config", ["family", "experts", "shapes"], _folder_without_config, "config.json"),
                ("mtl-without-config", ["references", "mtl"], _folder_without_config, "config.json"),
                ("dataset-not-saved-by-datasets", ["tasks", 1, "dataset"], _folder_that_is_no_dataset,
                 "dataset_dict.json"),
                ("heads-a-pickle", ["family", "heads"], _heads_as_pickle, ".safetensors"),
                ("heads-a-fifo", ["family", "heads"], _fifo, "not a regular file"),
                ("dataset-a-device", ["tasks", 1, "dataset"], lambda tmp: "/dev/zero", "not a dataset folder"),
                ("base-symlink-loop", ["family", "base"], _symlink_loop, "cannot be read"),
                ("base-relative-symlink-loop", ["family", "base"], _relative_symlink_loop, "cannot be resolved"),
                ("base-name-too-long", ["family", "base"], lambda tmp: "/" + "a" * 5000, "cannot be read")]


@pytest.mark.parametrize("case,where,make,says", LOCAL_INPUTS, ids=[c[0] for c in LOCAL_INPUTS])
def test_a_local_input_of_the_wrong_kind_is_refused_by_validate_and_before_submit_writes(
        case, where, make, says, fbh_env, tmp_path, seeded_db, monkeypatch):
    """What `submit` refuses, `validate` refuses too, and both before a submission or suite row is written."""
    suites = tmp_path / "suites"
    suites.mkdir()
    path = suites / "tiny-bad.yaml"
    path.write_text(yaml.safe_dump(suite_with(_set(where, make(tmp_path)))))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    field = ".".join(str(p) for p in where).replace(".1.", "[1].")
    started = time.monotonic()
    res = CliRunner().invoke(main, ["validate", str(path)])
    check_error(res, path.name, field, started)
    assert says in res.output
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    before = db_fingerprint(seeded_db)
    started = time.monotonic()
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-bad", "--db", str(seeded_db)])
    check_error(res, path.name, field, started)
    assert says in res.output and db_fingerprint(seeded_db) == before


def test_allow_pickle_lets_a_pickled_expert_through_the_kind_check(fbh_env, tmp_path):
    from harness.suites import local_input_problem
    from harness.spec import SuiteSpec
    spec = SuiteSpec.model_validate(suite_with(lambda s: s["family"].update(allow_pickle=True)))
    folder = Path(_folder_with_only_pickle_weights(tmp_path))
    assert local_input_problem(spec, "family.experts.shapes", "model", folder) is None
    strict = SuiteSpec.model_validate(suite_with(lambda s: None))
    assert "pickle" in local_input_problem(strict, "family.experts.shapes", "model", folder)[0]


def test_a_submission_is_validated_against_the_suites_it_would_run(fbh_env, tmp_path, monkeypatch):
    """`validate` of a submission makes submit's suite checks: a broken target suite is its error too."""
    suites = tmp_path / "suites"
    suites.mkdir()
    path = suites / "tiny-bad.yaml"
    path.write_text(yaml.safe_dump(suite_with(_set(["tasks", 0, "dataset"], "/etc/passwd"))))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump({**GOOD_SUB, "suites": ["tiny-bad"]}))
    check_error(CliRunner().invoke(main, ["validate", str(sub)]), "tiny-bad.yaml", "tasks[0].dataset")


# ----------------------------------------------------------------------------- typed recipes and bounded params

def test_every_recipe_schema_has_its_builders_defaults():
    """The schema's defaults are the builder's DEFAULT_RECIPE, key for key and value for value: a recipe
    value changed in one place and not the other fails here."""
    from harness.zoo import BUILDERS, default_recipe
    from harness.zoo.recipes import RECIPES, schema_defaults
    assert set(RECIPES) == set(BUILDERS)
    for builder in BUILDERS:
        assert schema_defaults(builder) == default_recipe(builder)


def test_a_bad_recipe_leaves_no_partial_build_and_starts_no_builder(tmp_path, monkeypatch):
    import harness.zoo
    from harness.errors import FbhError
    from conftest import SMALL_RECIPE
    monkeypatch.setenv("FBH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(harness.zoo, "run_builder", lambda *a: pytest.fail("the builder was started"))
    with pytest.raises(FbhError) as exc:
        harness.zoo.ensure_built("tiny_vision", {**SMALL_RECIPE, "n_test": "many"})
    assert exc.value.field == "family.zoo.recipe.n_test"
    assert not (tmp_path / "cache" / "zoo").exists() or not any((tmp_path / "cache" / "zoo").iterdir())


def test_every_size_like_method_param_is_bounded():
    """Each method's integer params have an upper bound and its list params a maximum length, so no
    submission can ask for unbounded steps, samples, ranks or lists."""
    import annotated_types
    import typing
    from harness import registry
    unbounded = []
    for name, info in registry.discover().items():
        for field_name, f in info.params.model_fields.items():
            shape = typing.get_args(f.annotation) or (f.annotation,)
            meta = f.metadata
            if int in shape and not any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in meta):
                unbounded.append(f"{name}.{field_name}")
            if any(typing.get_origin(t) is list for t in shape) and not any(
                    isinstance(m, annotated_types.MaxLen) for m in meta):
                unbounded.append(f"{name}.{field_name}")
    assert unbounded == []


# ----------------------------------------------------------------------------- broken disks under the database, cache

def _mount_tmpfs(path: Path, options: str) -> None:
    import os
    import subprocess
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("a full or read-only disk is simulated with a small tmpfs, which needs root to mount")


def _unmount(path: Path) -> None:
    import subprocess
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture()
def read_only_folder(tmp_path):
    """An empty folder nothing can be written into: chmod for a user, a read-only tmpfs for root (whom
    permission bits do not stop)."""
    import os
    import stat
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        os.chmod(folder, stat.S_IRWXU)
        return
    _mount_tmpfs(folder, "ro,size=64k")
    yield folder
    _unmount(folder)


@pytest.fixture()
def full_disk(tmp_path):
    """A 16 MiB tmpfs, filled by fill_disk."""
    folder = tmp_path / "full"
    _mount_tmpfs(folder, "size=16m")
    yield folder
    _unmount(folder)


def fill_disk(folder: Path) -> None:
    """Take the last free byte of the disk holding folder."""
    import os
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def submit_good(tmp_path, db, *extra, seconds=SECONDS):
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump(GOOD_SUB))
    started = time.monotonic()
    res = CliRunner().invoke(main, ["submit", str(sub), "--db", str(db), "--quiet", *extra])
    assert time.monotonic() - started < seconds and "Traceback" not in res.output, res.output
    return res


def test_a_new_database_in_a_read_only_folder_is_one_clear_error(tmp_path, fbh_env, read_only_folder):
    db = read_only_folder / "results.duckdb"
    res = submit_good(tmp_path, db)
    assert res.exit_code == 2 and str(db) in res.output and "fix:" in res.output, res.output
    assert not db.exists()


def test_a_full_disk_under_the_database_is_one_clear_error_and_changes_nothing(tmp_path, seeded_db, full_disk):
    import shutil
    db = full_disk / "results.duckdb"
    shutil.copy(seeded_db, db)
    before = db_fingerprint(db)
    fill_disk(full_disk)
    res = submit_good(tmp_path, db)
    assert res.exit_code == 2 and "disk is full" in res.output and str(db) in res.output, res.output
    assert "fix:" in res.output and db_fingerprint(db) == before


def _cache_file(tmp):
    (tmp / "cache-file").write_text("not a folder")
    return tmp / "cache-file", "is a file"


def _cache_under_a_file(tmp):
    (tmp / "cache-file").write_text("not a folder")
    return tmp / "cache-file" / "fbh", "Not a directory"


BAD_CACHE_PATHS = [("a-file", _cache_file), ("under-a-file", _cache_under_a_file),
                   ("name-too-long", lambda tmp: (Path("/" + "c" * 5000), "too long"))]


@pytest.mark.parametrize("case,make", BAD_CACHE_PATHS, ids=[c[0] for c in BAD_CACHE_PATHS])
def test_a_cache_path_that_cannot_be_a_folder_is_one_clear_error(case, make, tmp_path, seeded_db, monkeypatch):
    cache, says = make(tmp_path)
    monkeypatch.setenv("FBH_CACHE", str(cache))
    before = db_fingerprint(seeded_db)
    res = submit_good(tmp_path, seeded_db)
    check_error(res, str(cache)[:60], "FBH_CACHE")
    assert says in res.output and db_fingerprint(seeded_db) == before


def test_a_read_only_cache_is_one_clear_error(tmp_path, seeded_db, monkeypatch, read_only_folder):
    monkeypatch.setenv("FBH_CACHE", str(read_only_folder))
    before = db_fingerprint(seeded_db)
    res = submit_good(tmp_path, seeded_db)
    check_error(res, str(read_only_folder), "FBH_CACHE")
    assert db_fingerprint(seeded_db) == before


def test_a_full_disk_under_the_cache_is_one_clear_error(tmp_path, seeded_db, monkeypatch, full_disk):
    monkeypatch.setenv("FBH_CACHE", str(full_disk / "cache"))
    fill_disk(full_disk)
    before = db_fingerprint(seeded_db)
    res = submit_good(tmp_path, seeded_db)
    check_error(res, str(full_disk / "cache"), "FBH_CACHE")
    assert "full" in res.output and db_fingerprint(seeded_db) == before


def test_a_built_zoo_in_a_cache_turned_read_only_stops_before_any_run(tmp_path, fbh_env, seeded_db, monkeypatch):
    """The zoo is there and verifies, but runs would write test sets and outputs into the cache: refused
    before the submission's rows are written, not as a failed run."""
    import shutil
    import subprocess
    cache = tmp_path / "cache"
    _mount_tmpfs(cache, "size=64m")
    try:
        shutil.copytree(fbh_env / "cache" / "zoo", cache / "zoo", ignore=shutil.ignore_patterns("*.lock"))
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        monkeypatch.setenv("FBH_CACHE", str(cache))
        before = db_fingerprint(seeded_db)
        res = submit_good(tmp_path, seeded_db)
        check_error(res, str(cache), "FBH_CACHE")
        assert db_fingerprint(seeded_db) == before
    finally:
        _unmount(cache)


# ----------------------------------------------------------------------------- housekeeping

def _store_label(db, key, label, value):
    from harness.store import Run, Store
    Store(db).write_run(Run(run_key=key, kind="submission", label=label, suite="tiny-small"),
                        [{"task": "digits", "task_split": "seen", "condition": "clean", "severity": None,
                          "metric": "accuracy", "value": value, "n": 8, "ci_low": None, "ci_high": None}])


def test_leaderboard_csv_escapes_formula_cells_and_drops_invisible_characters(tmp_path, seeded_db):
    """Rows stored before labels were checked: a spreadsheet must not run them, a terminal or a page must
    not show them reordered. Numbers, negative ones too, stay numbers."""
    import csv
    import io
    _store_label(seeded_db, "k2", '=HYPERLINK("http://evil.example","x")', -3.0)
    _store_label(seeded_db, "k3", "+cmd|' /C calc'!A0", 1.0)
    _store_label(seeded_db, "k4", "evil\u202etxt.exe", 2.0)
    res = CliRunner().invoke(main, ["leaderboard", "--suite", "tiny-small", "--format", "csv", "--db", str(seeded_db)])
    assert res.exit_code == 0, res.output
    labels = [row["label"] for row in csv.DictReader(io.StringIO(res.output.strip()))]
    assert "'=HYPERLINK(\"http://evil.example\",\"x\")" in labels and "'+cmd|' /C calc'!A0" in labels
    assert "eviltxt.exe" in labels and not any(label[:1] in "=+-@" for label in labels)
    text = CliRunner().invoke(main, ["leaderboard", "--suite", "tiny-small", "--db", str(seeded_db)]).output
    assert "\u202e" not in text and "eviltxt.exe" in text
    from harness.leaderboard import csv_cell
    assert csv_cell("-3.0") == "-3.0" and csv_cell("-2+3") == "'-2+3" and csv_cell("\t=1") == "'\t=1"


def test_a_site_rebuild_keeps_files_it_did_not_write_and_cleans_dead_builds(tmp_path, seeded_db):
    import json
    import os
    import subprocess
    _store_label(seeded_db, "k4", "evil\u202etxt.exe", 2.0)
    out = tmp_path / "site"
    assert CliRunner().invoke(main, ["site", "build", "--db", str(seeded_db), "--out", str(out)]).exit_code == 0
    written = json.loads((out / ".fbh-site").read_text())["files"]
    assert "index.html" in written and all(not Path(f).is_absolute() for f in written)
    (out / "CNAME").write_text("leaderboard.example.org\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        old = time.time() - 3600
        stale = tmp_path / f".site.staging-{dead.pid}-abc"
        in_use = tmp_path / f".site.staging-{live.pid}-def"
        fresh = tmp_path / f".site.old-{dead.pid}-123"
        for folder in (stale, in_use, fresh):
            folder.mkdir()
            (folder / "index.html").write_text("half a site")
        for folder in (stale, in_use):
            os.utime(folder, (old, old))
        res = CliRunner().invoke(main, ["site", "build", "--db", str(seeded_db), "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert not stale.exists() and in_use.exists() and fresh.exists()
    finally:
        live.kill()
        live.wait()
    assert (out / "CNAME").read_text() == "leaderboard.example.org\n" and (out / "index.html").exists()
    pages = "".join(p.read_text() for p in out.rglob("*.html"))
    assert "\u202e" not in pages


def test_a_site_folder_without_a_manifest_is_refused_and_left_alone(tmp_path, seeded_db):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / ".fbh-site").write_text("built by `fbh site build`; a rebuild replaces this directory\n")  # older fbh
    res = CliRunner().invoke(main, ["site", "build", "--db", str(seeded_db), "--out", str(out)])
    check_error(res, str(out), "--out")
    assert (out / "thesis.tex").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == [
        ".fbh-site", "thesis.tex"]


def test_stale_zoo_build_folders_of_dead_processes_are_removed_and_no_live_ones(fbh_env):
    import os
    import subprocess
    from conftest import SMALL_RECIPE
    from harness.zoo import ensure_built
    zoo = fbh_env / "cache" / "zoo"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    old = time.time() - 3600
    stale = zoo / f"tiny_vision-000000000000.partial-{dead.pid}"
    stale_result = zoo / f"tiny_vision-000000000000.partial-{dead.pid}.result.json"
    in_use = zoo / f"tiny_vision-111111111111.partial-{live.pid}"
    fresh = zoo / f"tiny_vision-222222222222.partial-{dead.pid}"
    try:
        for folder in (stale, in_use, fresh):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        stale_result.write_text("{}")
        for path in (stale, stale_result, in_use):
            os.utime(path, (old, old))
        ensure_built("tiny_vision", SMALL_RECIPE)
        assert not stale.exists() and not stale_result.exists() and in_use.exists() and fresh.exists()
    finally:
        live.kill()
        live.wait()
        for folder in (stale, in_use, fresh):
            subprocess.run(["rm", "-rf", str(folder)])


def test_a_suite_named_twice_runs_once(tmp_path, fbh_env):
    db = tmp_path / "results.duckdb"
    twice = ["--suite", "tiny-small", "--suite", "tiny-small"]
    assert submit_good(tmp_path, db, *twice, seconds=600).exit_code == 0  # real runs, on a loaded machine
    res = submit_good(tmp_path, db, *twice)
    assert res.exit_code == 0 and res.output.count("cached") == 5, res.output


def test_a_site_on_a_full_or_read_only_disk_is_one_clear_error_and_the_old_site_stays(
        tmp_path, seeded_db, full_disk, read_only_folder):
    out = full_disk / "site"
    assert CliRunner().invoke(main, ["site", "build", "--db", str(seeded_db), "--out", str(out)]).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fill_disk(full_disk)
    for target in (out, read_only_folder / "site", tmp_path / "sub.yaml" / "site"):
        (tmp_path / "sub.yaml").write_text("name: x\n")
        started = time.monotonic()
        res = CliRunner().invoke(main, ["site", "build", "--db", str(seeded_db), "--out", str(target)])
        check_error(res, str(target.parent), "--out", started)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "site"]
