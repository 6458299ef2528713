"""fbh reads suites/, submissions/ and methods/ from the project it stands in (or $FBH_ROOT), not silently
from the checkout it was installed from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO


def fbh_in(cwd, *args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("FBH_SUITES_DIR", "FBH_SUBMISSIONS_DIR", "FBH_ROOT")}
    full.update(FBH_CACHE=str(cwd / ".cache"), PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def make_project(root):
    (root / "suites").mkdir(parents=True)
    (root / "submissions").mkdir()
    (root / "methods").mkdir()
    shutil.copy(REPO / "methods" / "__init__.py", root / "methods")
    source = (REPO / "methods" / "task_arithmetic.py").read_text().replace('@method("task_arithmetic"', '@method("my_ta"')
    (root / "methods" / "my_ta.py").write_text(source)
    shutil.copy(REPO / "suites" / "gpt2-glue.yaml", root / "suites")


def test_a_project_folder_brings_its_own_methods_and_suites(tmp_path):
    make_project(tmp_path / "proj")
    (tmp_path / "proj" / "deep" / "er").mkdir(parents=True)
    for cwd in (tmp_path / "proj", tmp_path / "proj" / "deep" / "er"):  # the nearest project above counts
        methods = [m["name"] for m in json.loads(fbh_in(cwd, "methods", "list", "--json").stdout)["methods"]]
        assert methods == ["my_ta"]
        suites = [s["name"] for s in json.loads(fbh_in(cwd, "suites", "list", "--json").stdout)["suites"]]
        assert suites == ["gpt2-glue"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pointed = json.loads(fbh_in(elsewhere, "suites", "list", "--json", FBH_ROOT=str(tmp_path / "proj")).stdout)
    assert [s["name"] for s in pointed["suites"]] == ["gpt2-glue"]
    installed = json.loads(fbh_in(elsewhere, "suites", "list", "--json").stdout)  # no project: fbh's own checkout
    assert "tiny-vision" in [s["name"] for s in installed["suites"]]
