"""The zoo: models and data that fbh builds itself, offline and deterministically.

A builder turns a recipe (a dict of knobs with defaults) into a directory laid out
exactly like downloaded artefacts (save_pretrained folders, datasets saved to disk,
safetensors heads), so the rest of the harness loads them through the same code as
real HuggingFace models. Directories are keyed by a hash of builder, recipe and
builder code (what to build); a finished build is never redone.

A build runs in its own process whose environment pins what makes float bytes depend on
the machine (kernel instruction set, threads, GPU), so AVX-512 and AVX2 machines build the
same bytes. Its marker (BUILD_COMPLETE.json) holds a manifest of every file (size, sha256)
and the manifest's digest, which names what was built: `zoo_digest` reads it, `verify_zoo`
checks every file against it, a suite may pin the digest it expects (family.zoo.digest),
and `zoo.share.export_zoo` / `import_zoo` carry one canonical build between machines. Torch-free: only
the builder's own process imports torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from harness.digests import CorruptFile, manifest_digest, tree_manifest, verify_manifest
from harness.errors import FbhError
from harness.paths import cache_dir
from harness.locks import file_lock, remove_stale
from harness.spec import DIGEST_PATTERN, load_suite

BUILDERS = {"tiny_vision": "harness.zoo.tiny_vision"}
DONE_MARKER = "BUILD_COMPLETE.json"


def builder_module(name: str):
    builder_file(name)  # the clear error for an unknown builder
    return importlib.import_module(BUILDERS[name])


def builder_file(name: str) -> Path:
    """The builder's source file, found without importing it (importing means torch)."""
    if name not in BUILDERS:
        raise FbhError(f"unknown zoo builder '{name}'", field="family.zoo.builder",
                       fix=f"use one of: {', '.join(BUILDERS)}")
    return Path(importlib.util.find_spec(BUILDERS[name]).origin)


def default_recipe(name: str) -> dict[str, Any]:
    """The builder's DEFAULT_RECIPE literal, read from its source so planning stays torch-free."""
    tree = ast.parse(builder_file(name).read_bytes())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if getattr(target, "id", None) == "DEFAULT_RECIPE":
            return ast.literal_eval(node.value)
    raise RuntimeError(f"zoo builder '{name}' defines no literal DEFAULT_RECIPE")


def resolved_recipe(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    recipe = default_recipe(name)
    unknown = sorted(set(overrides) - set(recipe))
    if unknown:
        raise FbhError(f"unknown recipe keys {unknown}", field="family.zoo.recipe",
                       fix=f"use keys of: {', '.join(sorted(recipe))}")
    recipe.update(overrides)
    from harness.zoo.recipes import check_recipe
    check_recipe(name, recipe)  # the whole recipe: a bound between two knobs holds whichever one was set
    return recipe


def zoo_key(name: str, recipe: dict[str, Any]) -> str:
    code = builder_file(name).read_bytes()
    blob = json.dumps({"builder": name, "recipe": recipe}, sort_keys=True).encode() + code
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def zoo_path(name: str, overrides: dict[str, Any]) -> Path:
    return cache_dir() / "zoo" / zoo_key(name, resolved_recipe(name, overrides))


# ----------------------------------------------------------------------------- the finished build: marker, digest

def read_marker(path: Path) -> dict[str, Any] | None:
    """The build's marker if it is one this code wrote: a manifest of every file and its digest.
    A marker from older code (no manifest) or a damaged one reads as no finished build."""
    try:
        marker = json.loads((Path(path) / DONE_MARKER).read_text())
        files, digest = marker["files"], marker["digest"]
        if isinstance(files, dict) and re.fullmatch(DIGEST_PATTERN, digest) and manifest_digest(files) == digest:
            return marker
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def is_built(path: Path) -> bool:
    return read_marker(path) is not None


def finished_marker(path: Path) -> dict[str, Any]:
    marker = read_marker(path)
    if marker is None:
        raise FbhError("no finished zoo build here (or one from older fbh code, without a manifest)",
                       file=str(path), fix="build it with `fbh zoo build SUITE`, or `fbh zoo import PATH`")
    return marker


def zoo_digest(path: Path) -> str:
    """'sha256:<hex>' naming what was built: the digest of the build's manifest (read from its marker)."""
    return finished_marker(path)["digest"]


def verify_zoo(path: Path) -> None:
    """Every file of the build is there with its size and sha256 (remembered by stat identity, so a
    second call costs stats only); raises CorruptFile naming the file and the fix."""
    marker = finished_marker(path)
    try:
        verify_manifest(path, marker["files"], what=f"zoo '{Path(path).name}'", fix="")
    except CorruptFile as exc:  # the fix names the suite, which takes reading every suite: only now
        raise CorruptFile(exc.message, file=exc.file, fix=rebuild_fix(marker.get("key"))) from None


def rebuild_fix(key: str | None) -> str:
    suites = suites_using(key) if key else []
    suite = suites[0] if suites else "SUITE"
    return (f"rebuild it with `fbh zoo build {suite} --force`, or install a verified export with "
            f"`fbh zoo import PATH --force`")


def suites_using(key: str) -> list[str]:
    """Names of the suites (in the suites directory) whose zoo has this key with this checkout's builder code."""
    from harness.paths import suites_dir
    names = []
    for path in sorted(suites_dir().glob("*.yaml")):
        try:
            zoo = load_suite(path).family.zoo
            if zoo is not None and zoo_key(zoo.builder, resolved_recipe(zoo.builder, zoo.recipe)) == key:
                names.append(path.stem)
        except FbhError:
            continue  # an invalid suite uses no zoo; `fbh validate` reports it
    return names


def build_versions(path: Path) -> dict[str, str]:
    """torch, python and the packages a finished build recorded (BUILD_COMPLETE.json's build_env)."""
    env = build_report(path).get("build_env", {})
    return {**({"torch": env["torch"]} if "torch" in env else {}), **({"python": env["python"]} if "python" in env
                                                                       else {}), **env.get("packages", {})}


def version_differences(pinned: dict[str, str] | None, path: Path) -> str:
    """'transformers 5.25.0 here, 5.17.0 pinned; ...' for every version the pinned build names that differs."""
    here = build_versions(path)
    return "; ".join(f"{name} {here.get(name, 'absent')} here, {version} pinned"
                     for name, version in sorted((pinned or {}).items()) if here.get(name) != version)


def zoo_pin_mismatch(spec_zoo, path: Path, suite_file: str | Path | None = None) -> str | None:
    """A plain message when the zoo built here is not the one the suite pins (family.zoo.digest); None when
    it is, or when the suite pins nothing."""
    pinned = getattr(spec_zoo, "digest", None)
    if pinned is None:
        return None
    built = zoo_digest(path)
    if built == pinned:
        return None
    where = f"{suite_file}: " if suite_file else ""
    differ = version_differences(getattr(spec_zoo, "built_with", None), path)
    return (f"warning: {where}the zoo built here ({Path(path).name}) has digest {built}, but the suite file field "
            f"family.zoo.digest pins {pinned}: runs are stored under this zoo's own fingerprint, apart from "
            f"the results computed on the pinned zoo."
            + (f" This build ran on other versions than the pinned one (family.zoo.built_with): {differ}." if differ
               else "")
            + "\n  fix: `fbh zoo import PATH` the zoo main's results were "
            f"computed on (`fbh zoo export SUITE PATH` there; main's CI saves tiny-vision's as "
            f"zoo-tiny-vision.tar.gz), or re-pin family.zoo.digest to {built} if this build is the new canonical one")


def ensure_suite_zoo(spec_zoo, suite_file: str | Path | None = None,
                     progress: Callable[[str], None] | None = None, force: bool = False) -> Path:
    """ensure_built for a suite's family.zoo, saying through progress when the build is not the pinned one
    (a warning, never a refusal: the runs are still right for the zoo they ran on). The runner opens a
    suite once per process, so a submit says it once."""
    path = ensure_built(spec_zoo.builder, spec_zoo.recipe, progress=progress, force=force)
    message = zoo_pin_mismatch(spec_zoo, path, suite_file)
    if message and progress is not None:
        progress(message)
    return path


# ----------------------------------------------------------------------------- the pinned build

# What decides which kernels, and so which float roundings, a build runs: ATen, MKL and oneDNN read
# these when torch is first imported. The builder's process never inherits them from its caller.
NUMERIC_ENV_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# AVX2 is what nearly every x86 machine of the last decade has: pinned to it, AVX-512 and AVX2 machines
# run the same kernels (bench/zoo_determinism.py shows which of these change the bytes).
AVX2_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NO_AVX2_NOTE = ("this CPU has no AVX2: the zoo is built with its own kernels, so its digest will differ "
                "from the one AVX2 machines build")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and whether it has AVX2 and AVX-512 (from /proc/cpuinfo; none known elsewhere)."""
    model, flags = platform.processor() or "unknown", None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = (part.strip() for part in line.partition(":"))
                if name == "model name":
                    model = value
                elif name == "flags" and flags is None:
                    flags = set(value.split())
                    break
    except OSError:
        pass
    flags = flags or set()
    return {"model": model, "avx2": "avx2" in flags, "avx512": "avx512f" in flags}


def build_pins(cpu: dict[str, Any]) -> dict[str, str]:
    """The builder process's settings: one thread (how a reduction is split across threads changes its
    rounding), no GPU (the build never depends on one, and its fine-tuning workers can always fork),
    and where the CPU has AVX2, ATen, MKL and oneDNN held to AVX2 kernels."""
    pins = {var: "1" for var in THREAD_ENV_VARS} | {"CUDA_VISIBLE_DEVICES": ""}
    return pins | AVX2_PINS if cpu["avx2"] else pins


def builder_environment(pins: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NUMERIC_ENV_VARS}
    env.update(pins)
    # The child runs this very harness, whichever one an editable install or sys.path would give it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    return env


def run_builder(name: str, staging: Path, recipe: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """Build into staging in a fresh Python process with the pinned settings (set before torch is
    imported there); its stdout lines are progress messages. Returns the builder's report and what
    the build ran with."""
    cpu = cpu_description()
    pins = build_pins(cpu)
    if not cpu["avx2"]:
        progress(NO_AVX2_NOTE)
    result_file = staging.with_name(staging.name + ".result.json")
    command = [sys.executable, "-m", "harness.zoo.child", name, str(staging), str(result_file), json.dumps(recipe)]
    proc = subprocess.Popen(command, env=builder_environment(pins), stdout=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")
    try:
        for line in proc.stdout:
            progress(line.rstrip("\n"))
        proc.wait()
    finally:
        if proc.poll() is None:  # the caller gave up (an interrupt, or its progress callback raised)
            proc.kill()
            proc.wait()
        proc.stdout.close()
    result = read_child_result(result_file)
    if proc.returncode != 0 or "error" in result:
        why = result.get("error") or f"its process ended with exit status {proc.returncode} and no error message"
        raise FbhError(f"zoo builder '{name}' failed: {why}", field="family.zoo",
                       fix="see the builder's traceback above; its partial build was removed, nothing was kept")
    env = {"pinned": pins, "cpu": cpu["model"], "avx2": cpu["avx2"], "avx512": cpu["avx512"],
           **{k: v for k, v in result.items() if k != "report"}}
    if not cpu["avx2"]:
        env["note"] = NO_AVX2_NOTE
    return {"report": result["report"], "build_env": env}


def read_child_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    finally:
        path.unlink(missing_ok=True)


def sort_safetensors_headers(root: Path) -> None:
    """safetensors writes its JSON header from a hash map, so a file with two metadata entries comes out
    in either order from one run to the next. Each header is rewritten with sorted keys at its own length
    (so every offset after it holds), making a file's bytes a function of its contents alone."""
    for path in sorted(Path(root).rglob("*.safetensors")):
        with open(path, "r+b") as f:
            size = int.from_bytes(f.read(8), "little")
            raw = f.read(size)
            text = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) <= size and text.ljust(size) != raw:
                f.seek(8)
                f.write(text.ljust(size))


def write_marker(staging: Path, name: str, key: str, recipe: dict[str, Any], built: dict[str, Any]) -> None:
    sort_safetensors_headers(staging)
    files = tree_manifest(staging, exclude=frozenset({DONE_MARKER}))
    marker = {"builder": name, "key": key, "digest": manifest_digest(files), "recipe": recipe,
              "build_env": built["build_env"], "report": built["report"], "files": files}
    (staging / DONE_MARKER).write_text(json.dumps(marker, indent=2))


def replace_dir(new: Path, final: Path) -> None:
    """Put new at final in one rename, moving any earlier build aside first (readers never see a half zoo)."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def remove_partials(final: Path) -> None:
    """Builds of this key that died with their process (the caller holds the key's lock, so none is live)."""
    for stale in final.parent.glob(f"{final.name}.partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def ensure_built(name: str, overrides: dict[str, Any], progress: Callable[[str], None] | None = None,
                 force: bool = False) -> Path:
    """The build dir of this builder and recipe, built first if needed (in a pinned child process, under
    the key's lock) and verified against its manifest."""
    say = progress or (lambda msg: None)
    recipe = resolved_recipe(name, overrides)
    key = zoo_key(name, recipe)
    final = cache_dir() / "zoo" / key
    if final.parent.is_dir():
        remove_stale(final.parent)  # any key's build and import folders whose process died
    if is_built(final) and not force:
        verify_zoo(final)
        return final
    from harness.paths import cache_error, writable_cache
    writable_cache()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_error(exc) from None
    with file_lock(final.with_suffix(".lock")):
        if is_built(final) and not force:
            verify_zoo(final)
            return final  # another process built it while we waited
        remove_partials(final)
        staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
        staging.mkdir(parents=True)
        try:
            built = run_builder(name, staging, recipe, say)
            write_marker(staging, name, key, recipe, built)
            replace_dir(staging, final)  # atomic: a crash leaves only a .partial dir, never a half zoo
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def build_report(path: Path) -> dict[str, Any]:
    return json.loads((path / DONE_MARKER).read_text())

