"""Suite and submission schemas: good files load, bad files give one clear error."""

import pytest

from harness.errors import FbhError
from harness.spec import load_submission, load_suite
from conftest import REPO, small_suite_spec


def test_repository_suites_and_submissions_are_valid():
    from harness.validate import validate_file
    files = sorted((REPO / "suites").glob("*.yaml")) + sorted((REPO / "submissions").glob("*.yaml"))
    assert files
    for f in files:
        assert validate_file(f) in ("suite", "submission")


def test_good_suite_loads(write_yaml):
    suite = load_suite(write_yaml("s.yaml", small_suite_spec()))
    assert suite.task_names == ["digits", "shapes", "textures"]
    assert suite.generalization[0].unseen == ["textures"]


def mutate(path_keys, value):
    spec = small_suite_spec()
    node = spec
    for k in path_keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path_keys[-1]]
    else:
        node[path_keys[-1]] = value
    return spec


@pytest.mark.parametrize("keys,value,field", [
    (["family", "kind"], KeyError, "family.kind"),
    (["tasks", 0, "metric"], "f1-ish", "tasks[0].metric"),
    (["tasks", 0, "bogus"], 1, "tasks[0].bogus"),
    (["corruptions", 0, "severity"], 9, "corruptions[0].severity"),
    (["name"], "Has Spaces", "name"),
    (["eval_batch_size"], "big", "eval_batch_size"),
])
def test_bad_suite_fields_are_named(write_yaml, keys, value, field):
    with pytest.raises(FbhError) as exc:
        load_suite(write_yaml("bad.yaml", mutate(keys, value)))
    assert exc.value.field == field
    assert "bad.yaml" in exc.value.render() and exc.value.fix


def test_suite_consistency_errors(write_yaml):
    spec = small_suite_spec()
    spec["generalization"][0]["unseen"] = ["nope"]
    with pytest.raises(FbhError, match="unknown tasks"):
        load_suite(write_yaml("g.yaml", spec))
    spec = small_suite_spec()
    del spec["family"]["experts"]["shapes"]
    with pytest.raises(FbhError, match="no expert"):
        load_suite(write_yaml("e.yaml", spec))


@pytest.mark.parametrize("splits,field,words", [
    ([{"name": "all", "seen": ["digits"], "unseen": ["shapes"]}], "generalization[0].name", "may not be named 'all'"),
    ([{"name": "two", "seen": ["digits"], "unseen": ["shapes"]},
      {"name": "two", "seen": ["shapes"], "unseen": ["digits"]}], "generalization[1].name", "named twice"),
])
def test_split_names_are_distinct_and_never_all(write_yaml, splits, field, words):
    with pytest.raises(FbhError) as exc:
        load_suite(write_yaml("g.yaml", {**small_suite_spec(), "generalization": splits}))
    assert exc.value.field == field and words in exc.value.message and exc.value.fix and "g.yaml" in exc.value.file


def test_a_corruption_may_repeat_at_another_severity_but_never_at_the_same(write_yaml):
    jpeg = [{"name": "jpeg", "severity": 1}, {"name": "jpeg", "severity": 5}]
    suite = load_suite(write_yaml("ok.yaml", {**small_suite_spec(), "corruptions": jpeg}))
    assert [(c.name, c.severity) for c in suite.corruptions] == [("jpeg", 1), ("jpeg", 5)]
    repeated = jpeg + [{"name": "jpeg", "severity": 1, "tasks": ["digits"]}]
    with pytest.raises(FbhError) as exc:
        load_suite(write_yaml("dup.yaml", {**small_suite_spec(), "corruptions": repeated}))
    assert exc.value.field == "corruptions[2]" and "corruptions[0]" in exc.value.message and "tasks" in exc.value.fix


def test_bad_yaml_reports_line(write_yaml):
    with pytest.raises(FbhError) as exc:
        load_submission(write_yaml("x.yaml", "name: a\nmethod: [unclosed\n"))
    assert "line" in exc.value.message and "x.yaml" in exc.value.render()


def test_submission_schema(write_yaml):
    sub = load_submission(write_yaml("ok.yaml", {"name": "ta", "method": "task_arithmetic",
                                                 "grid": {"scaling_factor": [0.1, 0.3]}}))
    assert sub.grid == {"scaling_factor": [0.1, 0.3]}
    for bad, field in [({"name": "ta"}, "method"),
                       ({"name": "ta", "method": "x", "url": "javascript:alert(1)"}, "url"),
                       ({"name": "ta", "method": "x", "params": {"a": 1}, "grid": {"a": [1]}}, "(top level)"),
                       ({"name": "ta", "method": "x", "seed": -1}, "seed")]:
        with pytest.raises(FbhError) as exc:
            load_submission(write_yaml("b.yaml", bad))
        assert exc.value.field == field, bad


def test_unknown_method_suggests_alternatives(write_yaml):
    from harness.validate import validate_file
    with pytest.raises(FbhError) as exc:
        validate_file(write_yaml("m.yaml", {"name": "x", "method": "task_arithmatic"}))
    assert exc.value.field == "method" and "task_arithmetic" in exc.value.fix
