"""Suite files share what they repeat through `include:` (a CLIP task's class names and templates are one
file, whatever suites evaluate it); a suite means what its includes expand to."""

from __future__ import annotations

import time

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from harness.cli import main
from harness.errors import FbhError
from harness.families.catalog import CLIP_DATASETS, PAPER_TABLES
from harness.spec import load_suite, read_suite_yaml, with_includes


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_an_include_is_merged_under_the_mapping_that_names_it(tmp_path):
    write(tmp_path / "_inc" / "task.yaml", {"name": "t", "split": "test", "extra": {"a": 1, "b": 2}})
    write(tmp_path / "_inc" / "more.yaml", {"include": "task.yaml", "split": "validation"})  # relative to itself
    data = {"tasks": [{"include": "_inc/task.yaml"}, {"include": ["_inc/more.yaml"], "name": "u", "extra": {"b": 3}}]}
    tasks = with_includes(data, tmp_path / "s.yaml")["tasks"]
    assert tasks[0] == {"name": "t", "split": "test", "extra": {"a": 1, "b": 2}}
    assert tasks[1] == {"name": "u", "split": "validation", "extra": {"a": 1, "b": 3}}


@pytest.mark.parametrize("include, files, message", [
    ("../outside.yaml", {}, "outside the suites folder"),
    ("_inc/self.yaml", {"_inc/self.yaml": {"include": "self.yaml"}}, "includes itself"),
    ("_inc/list.yaml", {"_inc/list.yaml": "- a\n- b\n"}, "top level must be a mapping"),
    ("_inc/missing.yaml", {}, "not found"),
    (7, {}, "include must name a file"),
    ("_inc/many.yaml", {"_inc/many.yaml": {"x": [{"include": "leaf.yaml"}] * 1001}, "_inc/leaf.yaml": {"a": 1}},
     "more than 1000 files included"),
])
def test_bad_includes_name_the_file_and_field(tmp_path, include, files, message):
    for rel, content in files.items():
        write(tmp_path / "suites" / rel, content)
    write(tmp_path / "outside.yaml", {"a": 1})
    suite = write(tmp_path / "suites" / "s.yaml", {"name": "s", "tasks": [{"include": include}]})
    started = time.monotonic()
    with pytest.raises(FbhError, match=message) as err:
        load_suite(suite)
    assert time.monotonic() - started < 10
    assert err.value.file and ("include" in (err.value.field or "") or message == "top level must be a mapping")
    res = CliRunner().invoke(main, ["validate", str(suite)])
    assert res.exit_code == 2 and "Traceback" not in res.output and message in res.output


def test_shipped_suites_share_each_clip_task_file():
    b32 = read_suite_yaml(REPO / "suites" / "clip-vit-b32-20tasks.yaml")
    l14 = read_suite_yaml(REPO / "suites" / "clip-vit-l14-8tasks.yaml")
    assert [t["name"] for t in b32["tasks"]] == list(CLIP_DATASETS)
    assert b32["tasks"][:8] == l14["tasks"]  # the same class names and templates, from one file each
    raw = yaml.safe_load((REPO / "suites" / "clip-vit-b32-20tasks.yaml").read_text())
    assert all(set(t) == {"include"} for t in raw["tasks"])
    assert len((REPO / "suites" / "clip-vit-b32-20tasks.yaml").read_text().splitlines()) < 100


def test_paper_tables_are_data_files():
    columns, lines = PAPER_TABLES["FusionBench Table 3"]
    assert columns[0] == "sun397" and dict(lines)["layer-wise AdaMerging"][0] == 67.9


def test_ci_validates_the_suites_that_include_a_changed_file():
    from harness.ci import changed_suites
    names = {p.stem for p in changed_suites(["suites/_include/clip-tasks/kmnist.yaml"])}
    assert names == {"clip-vit-b32-20tasks", "clip-vit-b16-20tasks", "clip-vit-l14-20tasks"}
    assert {p.stem for p in changed_suites(["suites/gpt2-glue.yaml", "README.md"])} == {"gpt2-glue"}
