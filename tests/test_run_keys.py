"""Run keys come from one source of truth: a method's code is what the registry says it is (its
module and the methods/ modules it imports), the harness's is the declared result-shaping modules,
both hashed by syntax; the setting's kind is in the key; a corruption at several severities is
several conditions everywhere."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, SMALL_TASKS, small_suite_spec
from harness import planner, registry
from harness.code_identity import source_digest
from harness.errors import FbhError
from harness.spec import SubmissionSpec, SuiteSpec, load_suite
from harness.store import Run, Store


# ----------------------------------------------------------------------------- helpers

@pytest.fixture()
def more_methods(tmp_path, monkeypatch):
    """A temporary folder on the `methods` package's path: write(files) puts modules there and
    registers them the way every method is (registry.discover). The registry and sys.modules are
    restored afterwards, so other tests never see these methods."""
    import methods
    folder = tmp_path / "more_methods"
    folder.mkdir()
    registry.discover()
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BROKEN", {})
    before = set(sys.modules)

    def write(files: dict[str, str]) -> Path:
        for name, text in files.items():
            (folder / name).write_text(text)
        importlib.invalidate_caches()
        monkeypatch.setattr(registry, "_discovered", False)
        registry.discover()
        return folder

    yield write
    for name in set(sys.modules) - before:
        if name.startswith("methods."):
            del sys.modules[name]


@pytest.fixture()
def suite(write_yaml, tmp_path, monkeypatch) -> SuiteSpec:
    monkeypatch.setenv("FBH_CACHE", str(tmp_path / "cache"))  # planning may write the methods' index there
    return load_suite(write_yaml("tiny-small.yaml", small_suite_spec()))


def inputs_of(suite: SuiteSpec) -> planner.SuiteInputs:
    """The suite on a fixed (made-up) zoo digest: keys here depend on code, not on a build."""
    from harness.identity import fingerprint
    inputs = {"zoo": "sha256:" + "0" * 64}
    return planner.SuiteInputs(fingerprint(suite, inputs), inputs)


def submission_keys(suite: SuiteSpec, method: str) -> tuple[str, ...]:
    sub = SubmissionSpec(name=method.replace("_", "-"), method=method)
    return tuple(job.key for _, job in planner.submission_jobs(sub, suite, inputs_of(suite)))


def every_key(suite: SuiteSpec, methods: list[str]) -> dict[str, tuple[str, ...]]:
    """'references' and each method -> its run keys on the suite."""
    return {"references": tuple(j.key for j in planner.reference_jobs(suite, inputs_of(suite))),
            **{m: submission_keys(suite, m) for m in methods}}


def method_module(name: str, body_import: str = "", top_import: str = "") -> str:
    """A merging method (keyword spelling of @method) that may import a helper at the top or inside."""
    return f'''"""Test-only method {name}: the base model, scaled by a helper or not."""
from harness.api import method
{top_import}


@method(name="{name}", category="merging")
def fuse(ctx, params):
    {body_import or "pass"}
    return dict(ctx.base)
'''


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


# ----------------------------------------------------------------------------- code identity

def test_source_digest_sees_code_and_not_comments_layout_or_docstrings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Module doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    digest = source_digest(path)
    path.write_text('"""Another doc."""\n# a comment\ndef f( x ):  # why\n    """Other doc."""\n\n    return (x + 1)\n')
    assert source_digest(path) == digest
    path.write_text('"""Module doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 2\n')
    assert source_digest(path) != digest


def test_a_method_registered_with_name_keyword_is_keyed_by_its_code(more_methods, suite):
    folder = more_methods({"copied_average.py": (REPO / "methods" / "simple_average.py").read_text().replace(
        '@method("simple_average", ', '@method(name="copied_average", ')})
    assert registry.get("copied_average").source_file == (folder / "copied_average.py").resolve()
    before = every_key(suite, ["copied_average", "simple_average"])

    append(folder / "copied_average.py", "# a comment: no new results\n")
    edit(folder / "copied_average.py", "Simple averaging", "Plain averaging")  # the docstring
    assert every_key(suite, ["copied_average", "simple_average"]) == before

    edit(folder / "copied_average.py", "mean(experts, k)", "mean(experts[:1], k)")
    after = every_key(suite, ["copied_average", "simple_average"])
    assert set(after["copied_average"]).isdisjoint(before["copied_average"])
    assert after["simple_average"] == before["simple_average"] and after["references"] == before["references"]


def test_a_change_to_one_method_rekeys_only_its_runs(more_methods, suite):
    folder = more_methods({"keys_alpha.py": method_module("keys_alpha"), "keys_beta.py": method_module("keys_beta")})
    names = ["keys_alpha", "keys_beta", "task_arithmetic"]
    before = every_key(suite, names)
    edit(folder / "keys_alpha.py", "return dict(ctx.base)", "return {k: v.clone() for k, v in ctx.base.items()}")
    after = every_key(suite, names)
    assert set(after["keys_alpha"]).isdisjoint(before["keys_alpha"])
    del after["keys_alpha"], before["keys_alpha"]
    assert after == before  # keys_beta, task_arithmetic and the references keep their keys


SPELLINGS = {  # method -> (top-level import, import inside the function)
    "keys_from_absolute": ("from methods._keys_helper import scale", ""),
    "keys_import_as": ("import methods._keys_helper as helper", ""),
    "keys_from_package": ("from . import _keys_helper", ""),
    "keys_from_relative": ("from ._keys_helper import scale", ""),
    "keys_inside_function": ("", "from methods._keys_helper import scale"),
    "keys_no_helper": ("", ""),
}


def test_a_shared_helper_rekeys_the_methods_importing_it_however_spelled(more_methods, suite):
    folder = more_methods({
        "_keys_deeper.py": "FACTOR = 1.0\n",
        "_keys_helper.py": '"""A helper shared by methods."""\nfrom ._keys_deeper import FACTOR\n\n\n'
                           "def scale(x):\n    return x * FACTOR\n",
        **{f"{name}.py": method_module(name, inside, top) for name, (top, inside) in SPELLINGS.items()}})
    importers = [n for n in SPELLINGS if n != "keys_no_helper"]
    for name in importers:
        assert {"methods._keys_helper", "methods._keys_deeper"} <= set(registry.get(name).code_files()), name
    before = every_key(suite, [*SPELLINGS, "simple_average"])

    append(folder / "_keys_helper.py", "# a comment re-keys nothing\n")
    assert every_key(suite, [*SPELLINGS, "simple_average"]) == before

    edit(folder / "_keys_helper.py", "return x * FACTOR", "return x * FACTOR * 2")
    after = every_key(suite, [*SPELLINGS, "simple_average"])
    assert [n for n in SPELLINGS if set(after[n]).isdisjoint(before[n])] == importers
    assert all(after[n] == before[n] for n in ("keys_no_helper", "simple_average", "references"))

    edit(folder / "_keys_deeper.py", "1.0", "0.5")  # imported by the helper only: transitively theirs
    again = every_key(suite, [*SPELLINGS, "simple_average"])
    assert [n for n in SPELLINGS if set(again[n]).isdisjoint(after[n])] == importers


def test_ci_runs_the_submissions_whose_methods_import_a_changed_helper():
    from harness.ci import affected_submissions
    from harness.spec import load_submission
    affected = affected_submissions(["methods/_common.py"])
    importing = {p for p in (REPO / "submissions").glob("*.yaml")
                 if "methods._common" in registry.get(load_submission(p).method).code_files()}
    assert importing and set(affected) == importing  # e.g. breadcrumbs and TSV, not simple_average
    assert all("methods/_common.py" in why for why in affected.values())
    assert affected_submissions(["harness/site.py", "harness/families/catalog.py"]) == {}
    assert len(affected_submissions(["harness/evaluate.py"])) == len(list((REPO / "submissions").glob("*.yaml")))


def test_a_broken_method_module_leaves_the_others_plannable(more_methods, suite):
    more_methods({"keys_broken.py": "raise ImportError('no such library')\n",
                  "keys_fine.py": method_module("keys_fine")})
    assert submission_keys(suite, "keys_fine")
    assert "ImportError: no such library" in registry.import_failures()["methods.keys_broken"]
    with pytest.raises(FbhError, match="methods.keys_broken failed to import"):
        registry.get("keys_broken")


IDENTITY_IN_A_FRESH_PROCESS = """
import json, sys
import methods
methods.__path__ += sys.argv[2:]  # folders added to the methods package
from harness import registry
print(json.dumps({"identity": registry.code_identity(sys.argv[1]), "torch": "torch" in sys.modules}))
"""


def test_planning_takes_the_methods_modules_from_the_index_while_no_methods_file_changed(tmp_path):
    """A fresh process asks a method's code identity as planning does: the first discovers every method
    (importing torch) and writes the index; the next answers from it without importing anything; a file
    added to or changed in the methods package makes the next process discover again."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FBH_CACHE": str(tmp_path / "cache")}

    def identity(name: str, *folders: Path) -> dict:
        proc = subprocess.run([sys.executable, "-c", IDENTITY_IN_A_FRESH_PROCESS, name, *map(str, folders)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    first, again = identity("weighted_average"), identity("weighted_average")
    assert first["torch"] and not again["torch"]
    assert first["identity"] == again["identity"] == registry.get("weighted_average").code_identity()

    folder = tmp_path / "more_methods"
    folder.mkdir()
    (folder / "keys_new.py").write_text(method_module("keys_new"))
    assert identity("keys_new", folder)["torch"]  # a new file: discovered
    indexed = identity("keys_new", folder)
    assert not indexed["torch"]
    edit(folder / "keys_new.py", "return dict(ctx.base)", "return {k: v for k, v in ctx.base.items()}")
    edited = identity("keys_new", folder)
    assert edited["torch"] and edited["identity"] != indexed["identity"]


# ----------------------------------------------------------------------------- harness code

@pytest.fixture()
def harness_copy(tmp_path, monkeypatch) -> Path:
    """The planner hashes a copy of harness/, so tests can edit it."""
    copy = tmp_path / "harness"
    shutil.copytree(REPO / "harness", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(planner, "HARNESS_DIR", copy)
    return copy


def test_comments_and_presentation_code_rekey_nothing(harness_copy, suite):
    before = every_key(suite, ["simple_average", "ties_merging"])
    for rel in ("families/catalog.py", "site.py", "leaderboard.py", "evaluate.py", "tensors.py"):
        append(harness_copy / rel, "\n# a comment\n")
    edit(harness_copy / "evaluate.py", '"""Evaluate a fused result', '"""Score a fused result')  # docstring
    append(harness_copy / "site.py", "\n\ndef a_new_chart():\n    return {}\n")  # presentation code
    append(harness_copy / "families/catalog.py", "\nEXTRA_SUITE = {}\n")  # writes YAML only
    assert every_key(suite, ["simple_average", "ties_merging"]) == before


def test_a_change_to_result_shaping_code_rekeys_every_run(harness_copy, suite):
    before = every_key(suite, ["simple_average", "ties_merging"])
    edit(harness_copy / "evaluate.py", "BOOTSTRAP_SAMPLES = 1000", "BOOTSTRAP_SAMPLES = 2000")
    after = every_key(suite, ["simple_average", "ties_merging"])
    assert all(set(after[k]).isdisjoint(before[k]) for k in before)


def test_the_declared_result_shaping_modules_exist_and_cover_every_family():
    from harness.families import FAMILIES
    for rel in planner.RESULT_SHAPING_MODULES:
        assert (planner.HARNESS_DIR / rel).is_file(), rel
    for target in FAMILIES.values():
        rel = target.split(":")[0].removeprefix("harness.").replace(".", "/") + ".py"
        assert rel in planner.RESULT_SHAPING_MODULES, f"family module {rel} shapes results: declare it"
    assert "families/catalog.py" not in planner.RESULT_SHAPING_MODULES


# ----------------------------------------------------------------------------- settings

def test_the_setting_kind_is_in_the_key():
    """A split named 'all' is refused by load_suite (test_spec); even past that check, its runs
    could never take the 'all' setting's key."""
    split = {"name": "all", "seen": SMALL_TASKS[:2], "unseen": SMALL_TASKS[2:]}
    suite = SuiteSpec.model_validate({**small_suite_spec(), "generalization": [split]})
    jobs = planner.submission_jobs(SubmissionSpec(name="avg", method="simple_average"), suite, inputs_of(suite))
    assert [(s.kind, s.name) for s, _ in jobs] == [("all", "all"), ("generalization", "all")]
    assert len({job.key for _, job in jobs}) == 2


# ----------------------------------------------------------------------------- corruptions at several severities

SEVERITIES = [{"name": "jpeg", "severity": 1}, {"name": "jpeg", "severity": 5},
              {"name": "gaussian_noise", "severity": 3}]


def test_one_corruption_at_two_severities_is_two_robustness_columns(tmp_path):
    from harness.leaderboard import robustness, table
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    store.upsert_suite({"name": "sev", "title": "sev", "corruptions": SEVERITIES,
                        "tasks": [{"name": t} for t in ("a", "b")]}, "h")
    values = {("clean", None): 80.0, ("jpeg", 1): 70.0, ("jpeg", 5): 40.0, ("gaussian_noise", 3): 60.0}
    for label, shift in (("STL", 10.0), ("avg", 0.0)):
        rows = [{"task": t, "task_split": "seen", "condition": c, "severity": s, "metric": "accuracy",
                 "value": v + shift + i, "n": 10} for (c, s), v in values.items() for i, t in enumerate(("a", "b"))]
        store.write_run(Run(run_key=f"sev/{label}", kind="reference" if label == "STL" else "submission",
                            label=label, suite="sev", finished_at=datetime(2026, 1, 1)), rows)

    _, entries = robustness(store, "sev", ["jpeg@1", "jpeg@5", "gaussian_noise"])
    avg = next(e for e in entries if e.label == "avg")
    assert avg.extra["conditions"] == {"jpeg@1": 70.5, "jpeg@5": 40.5, "gaussian_noise": 60.5}
    assert table(store, "sev", condition="jpeg@5")[1][1].scores == {"a": 40.0, "b": 41.0}
    assert table(store, "sev", condition="gaussian_noise")[1][1].scores == {"a": 60.0, "b": 61.0}
    with pytest.raises(FbhError) as exc:
        table(store, "sev", condition="jpeg")
    assert exc.value.field == "--condition" and "jpeg@1, jpeg@5" in exc.value.fix

    build(store, tmp_path / "site")
    header = (tmp_path / "site" / "suites" / "sev" / "robustness.csv").read_text().splitlines()[0]
    assert header.split(",")[2:] == ["clean", "jpeg@1", "jpeg@5", "gaussian_noise", "corrupted mean"]
    page = (tmp_path / "site" / "suites" / "sev" / "submissions" / "avg.html").read_text()
    robust = page.split('id="robustness"')[1].split("</table>")[0]
    assert "<th>jpeg@1</th><th>jpeg@5</th><th>gaussian_noise</th>" in robust
    assert ">40.0<" in robust and ">70.0<" in robust


@pytest.mark.slow
def test_severities_are_kept_apart_from_evaluation_to_the_cli(fbh_env, tmp_path, monkeypatch):
    from harness.cli import main
    suites = tmp_path / "suites"
    suites.mkdir()
    spec = {**small_suite_spec("tiny-severities"), "default": False, "corruptions": SEVERITIES[:2],
            "generalization": [], "references": {"computed": ["pretrained"]}}
    (suites / "tiny-severities.yaml").write_text(json.dumps(spec))
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))  # the session's zoo cache is kept
    db = tmp_path / "sev.duckdb"
    sub = REPO / "submissions" / "simple_average.yaml"
    res = CliRunner().invoke(main, ["submit", str(sub), "--suite", "tiny-severities", "--db", str(db)])
    assert res.exit_code == 0, res.output
    rows = Store(db).query("SELECT DISTINCT condition, severity FROM results ORDER BY ALL")
    assert [(r["condition"], r["severity"]) for r in rows] == [("clean", None), ("jpeg", 1), ("jpeg", 5)]
    boards = {c: json.loads(CliRunner().invoke(main, ["leaderboard", "--suite", "tiny-severities", "--db", str(db),
                                                      "--format", "json", "--condition", c]).output)
              for c in ("jpeg@1", "jpeg@5")}
    assert boards["jpeg@1"]["entries"] != boards["jpeg@5"]["entries"]
    ambiguous = CliRunner().invoke(main, ["leaderboard", "--suite", "tiny-severities", "--db", str(db),
                                          "--condition", "jpeg"])
    assert ambiguous.exit_code == 2 and "jpeg@1, jpeg@5" in ambiguous.output
