"""The zoo: models and data that fbh builds itself, offline and deterministically.

A builder turns a recipe (a dict of knobs with defaults) into a directory laid out
exactly like downloaded artefacts (save_pretrained folders, datasets saved to disk,
safetensors heads), so the rest of the harness loads them through the same code as
real HuggingFace models. Directories are keyed by a hash of builder, recipe and
builder code; a finished build is never redone.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from harness.errors import FbhError
from harness.paths import cache_dir
from harness.locks import file_lock

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
    return recipe


def zoo_key(name: str, recipe: dict[str, Any]) -> str:
    code = builder_file(name).read_bytes()
    blob = json.dumps({"builder": name, "recipe": recipe}, sort_keys=True).encode() + code
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def zoo_path(name: str, overrides: dict[str, Any]) -> Path:
    return cache_dir() / "zoo" / zoo_key(name, resolved_recipe(name, overrides))


def is_built(path: Path) -> bool:
    return (path / DONE_MARKER).is_file()


def ensure_built(name: str, overrides: dict[str, Any], progress: Callable[[str], None] | None = None,
                 force: bool = False) -> Path:
    recipe = resolved_recipe(name, overrides)
    final = cache_dir() / "zoo" / zoo_key(name, recipe)
    if is_built(final) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.with_suffix(".lock")):
        if is_built(final) and not force:
            return final  # another process built it while we waited
        staging = final.with_name(final.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        report = builder_module(name).build(staging, recipe, progress or (lambda msg: None))
        (staging / DONE_MARKER).write_text(json.dumps({"recipe": recipe, "report": report}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)  # atomic: a crash leaves only a .partial dir, never a half zoo
    return final


def build_report(path: Path) -> dict[str, Any]:
    return json.loads((path / DONE_MARKER).read_text())


# Provisional (replaced by the manifest written at build time on the zoo-determinism branch).
def zoo_digest(path: Path) -> str:
    from harness.digests import manifest_digest, tree_manifest
    marker = json.loads((path / DONE_MARKER).read_text())
    return marker.get("digest") or manifest_digest(tree_manifest(path, exclude=frozenset({DONE_MARKER})))


def verify_zoo(path: Path) -> None:
    from harness.digests import verify_manifest
    files = json.loads((path / DONE_MARKER).read_text()).get("files")
    if files:
        verify_manifest(path, files, what=f"zoo {path.name}", fix="rebuild it: fbh zoo build SUITE --force")
