"""A zoo is identified by what was built: the same bytes whatever ATen capability the caller's
process runs with (the build pins its own), every file checked against the build's manifest,
carried between caches by export and import, and compared with the digest a suite pins.
Real builds of the shrunken zoo, shared across the module."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, SMALL_RECIPE, small_suite_spec
from harness.cli import main
from harness.digests import CorruptFile
from harness.errors import FbhError
from harness.zoo import (DONE_MARKER, cpu_description, ensure_built, ensure_suite_zoo, is_built, verify_zoo,
                         zoo_digest, zoo_key, resolved_recipe)
from harness.zoo.share import export_zoo
from harness.spec import ZooSpec

pytestmark = pytest.mark.slow

BUILD_AND_REPORT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import SMALL_RECIPE
from harness.zoo import build_report, ensure_built
path = ensure_built("tiny_vision", SMALL_RECIPE)
print(json.dumps({"path": str(path), "marker": build_report(path)}))
"""
KEY = zoo_key("tiny_vision", resolved_recipe("tiny_vision", SMALL_RECIPE))
EXPERT = "experts/digits/model.safetensors"


def start_build(cache, aten_capability: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env.update(FBH_CACHE=str(cache), PYTHONPATH=str(REPO))
    if aten_capability:
        env["ATEN_CPU_CAPABILITY"] = aten_capability
    return subprocess.Popen([sys.executable, "-c", BUILD_AND_REPORT, str(REPO / "tests")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The shrunken zoo built at once by two processes whose own ATen capability differs (this CPU's
    widest, and avx2), each into its own cache: {capability: (build dir, marker)}."""
    root = tmp_path_factory.mktemp("zoo-identity")
    widest = "avx512" if cpu_description()["avx512"] else None
    procs = {cap or "unset": start_build(root / (cap or "unset"), cap) for cap in (widest, "avx2")}
    out = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        got = json.loads(stdout.strip().splitlines()[-1])
        out[cap] = (got["path"], got["marker"])
    return out


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Digest memos, imports and builds of each test land in its own cache, never the user's."""
    monkeypatch.setenv("FBH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FBH_SUITES_DIR", raising=False)
    return tmp_path / "cache"


def copy_of(builds, tmp_path):
    path, _ = builds["avx2"]
    return shutil.copytree(path, tmp_path / KEY)


def test_parent_aten_capability_does_not_change_the_bytes(builds):
    (_, widest), (_, avx2) = builds.values()
    assert widest["digest"] == avx2["digest"] and widest["files"] == avx2["files"]
    assert widest["digest"].startswith("sha256:") and len(widest["digest"]) == 71
    for marker in (widest, avx2):
        env = marker["build_env"]
        assert env["threads"] == 1 and env["pinned"]["CUDA_VISIBLE_DEVICES"] == ""
        if cpu_description()["avx2"]:
            assert env["aten_capability"] == "AVX2" and env["pinned"]["ATEN_CPU_CAPABILITY"] == "avx2"
            assert env["pinned"]["MKL_CBWR"] == "AVX2" and env["pinned"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert env["torch"].startswith("2.13") and env["cpu"] and "avx512" in env
        assert DONE_MARKER not in marker["files"] and EXPERT in marker["files"]


def test_verify_catches_rewritten_weights_with_restored_mtime_and_a_deleted_file(builds, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    zoo = copy_of(builds, tmp_path)
    verify_zoo(zoo)
    verify_zoo(zoo)  # the second time from the stat memo
    expert = zoo / EXPERT
    before, original = expert.stat(), expert.read_bytes()
    tensors = load_file(expert)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(expert),
              metadata={"format": "pt"})
    os.utime(expert, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert expert.stat().st_size == before.st_size and expert.stat().st_mtime_ns == before.st_mtime_ns
    assert not torch.equal(next(iter(load_file(expert).values())), next(iter(tensors.values())))
    with pytest.raises(CorruptFile) as exc:
        verify_zoo(zoo)
    assert exc.value.file == str(expert) and EXPERT in exc.value.message
    assert "fbh zoo build" in exc.value.fix and "--force" in exc.value.fix and "fbh zoo import" in exc.value.fix

    expert.write_bytes(original)
    verify_zoo(zoo)  # the original bytes are the original build again
    (zoo / "heads.safetensors").unlink()
    with pytest.raises(CorruptFile) as exc:
        verify_zoo(zoo)
    assert exc.value.file == str(zoo / "heads.safetensors") and "missing 'heads.safetensors'" in exc.value.message


def fbh(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_export_import_round_trip_into_a_fresh_cache(builds, tmp_path, own_cache):
    path, marker = builds["avx2"]
    tarball = export_zoo(path, tmp_path / "zoo.tar.gz")
    folder = export_zoo(path, tmp_path / "zoo-folder")
    assert (folder / DONE_MARKER).is_file() and (folder / EXPERT).is_file()
    res = fbh("zoo", "import", str(tarball))
    assert res.exit_code == 0, res.output
    installed = own_cache / "zoo" / KEY
    assert is_built(installed) and zoo_digest(installed) == marker["digest"]
    verify_zoo(installed)
    assert "installed" in res.stdout and marker["digest"] in res.stdout
    # Where a suite uses the key, ensure_built finds the imported zoo: nothing is rebuilt.
    assert ensure_built("tiny_vision", SMALL_RECIPE) == installed
    assert fbh("zoo", "import", str(folder)).stdout.startswith("already installed")
    assert not [p for p in (own_cache / "zoo").iterdir() if p.name.startswith(".import-")]


def rewrite_tarball(src, dest, change):
    """A copy of the tarball whose members pass through change(info, data) -> [(info, data)]."""
    with tarfile.open(src) as tar, tarfile.open(dest, "w:gz") as out:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else None
            for new_info, new_data in change(info, data):
                if new_data is not None:
                    new_info.size = len(new_data)
                out.addfile(new_info, io.BytesIO(new_data) if new_data is not None else None)
    return dest


def flip_last_byte(info, data):
    if info.name.endswith(EXPERT):
        data = data[:-1] + bytes([data[-1] ^ 1])
    return [(info, data)]


def add_escaping_member(info, data):
    escaping = tarfile.TarInfo("../outside.txt")
    return [(info, data), (escaping, b"x")] if info.name.endswith(DONE_MARKER) else [(info, data)]


def add_symlink(info, data):
    link = tarfile.TarInfo(f"{KEY}/experts/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [(info, data), (link, None)] if info.name.endswith(DONE_MARKER) else [(info, data)]


def drop_marker(info, data):
    return [] if info.name.endswith(DONE_MARKER) else [(info, data)]


def edit_marker_digest(info, data):
    if info.name.endswith(DONE_MARKER):
        marker = json.loads(data)
        marker["files"][EXPERT]["sha256"] = "sha256:" + "0" * 64
        data = json.dumps(marker).encode()
    return [(info, data)]


@pytest.mark.parametrize("change, named", [
    (flip_last_byte, EXPERT),
    (add_escaping_member, "../outside.txt"),
    (add_symlink, "is a link"),
    (drop_marker, DONE_MARKER),
    (edit_marker_digest, "does not have the digest"),
])
def test_tampered_tarball_is_refused_and_nothing_installed(builds, tmp_path, own_cache, change, named):
    path, _ = builds["avx2"]
    tarball = rewrite_tarball(export_zoo(path, tmp_path / "good.tar.gz"), tmp_path / "bad.tar.gz", change)
    res = fbh("zoo", "import", str(tarball))
    assert res.exit_code == 2, res.output
    assert named in res.stderr and "fix:" in res.stderr and str(tarball) in res.stderr
    assert not (own_cache / "zoo" / KEY).exists() and not (tmp_path / "outside.txt").exists()
    assert not [p for p in (own_cache / "zoo").iterdir() if p.name.startswith(".import-")]


def test_wrong_pin_still_builds_says_so_once_and_old_markers_are_rebuilt(tmp_path, own_cache, monkeypatch):
    suites = tmp_path / "suites"
    suites.mkdir()
    monkeypatch.setenv("FBH_SUITES_DIR", str(suites))
    spec = small_suite_spec()
    wrong = "sha256:" + "0" * 64
    spec["family"]["zoo"]["digest"] = wrong
    (suites / "tiny-small.yaml").write_text(yaml.safe_dump(spec))
    old = own_cache / "zoo" / KEY  # what older fbh code left: a marker with no manifest
    old.mkdir(parents=True)
    (old / DONE_MARKER).write_text(json.dumps({"recipe": {}, "report": {}}))
    assert not is_built(old)

    res = fbh("zoo", "build", "tiny-small")
    assert res.exit_code == 0, res.output
    built = own_cache / "zoo" / KEY
    assert res.stdout.strip() == str(built) and is_built(built)
    assert "generated data for 3 tasks" in res.stderr  # the builder process's progress reached the caller
    digest = zoo_digest(built)
    assert res.stderr.count(wrong) == 1 and "family.zoo.digest" in res.stderr and digest in res.stderr
    assert "fbh zoo import" in res.stderr
    # A process that runs the suite opens it once, and says it once, through the run's progress.
    from harness.runner import open_suite
    said = []
    for _ in range(2):
        assert open_suite("tiny-small", "cpu", progress=said.append).zoo_dir == built
    assert sum("family.zoo.digest" in m for m in said) == 1
    said.clear()
    right = ZooSpec(**{**spec["family"]["zoo"], "digest": digest})
    assert ensure_suite_zoo(right, progress=said.append) == built and said == []
    # A pin that says what it was built with names the versions that differ here.
    from harness.zoo import build_versions, zoo_pin_mismatch
    here = build_versions(built)
    assert {"torch", "python", "transformers", "numpy", "scikit-learn", "pillow"} <= set(here)
    pinned = ZooSpec(**{**spec["family"]["zoo"], "built_with": {**here, "transformers": "4.0.0"}})
    message = zoo_pin_mismatch(pinned, built)
    assert f"transformers {here['transformers']} here, 4.0.0 pinned" in message and "numpy" not in message


def test_a_failing_builder_raises_its_error_and_leaves_no_partial_build(own_cache, monkeypatch):
    import harness.zoo.recipes
    monkeypatch.setattr(harness.zoo.recipes, "check_recipe", lambda name, recipe: None)  # the builder's own error
    with pytest.raises(FbhError) as exc:
        ensure_built("tiny_vision", {**SMALL_RECIPE, "tasks": ["digits", "no-such-task"]})
    assert "zoo builder 'tiny_vision' failed" in exc.value.message
    assert "ValueError: unknown tiny-vision tasks ['no-such-task']" in exc.value.message
    assert [p.name for p in (own_cache / "zoo").iterdir() if not p.name.endswith(".lock")] == []
