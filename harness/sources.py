"""Resolve the model and data references in a suite to something loadable.

A reference is one of: `zoo://rel/path` (built by the harness), a path relative to
the suite file or absolute, or a HuggingFace hub id. The same from_pretrained /
load_dataset calls then load all three, so the zoo exercises the real code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import FbhError, SuiteUnavailable

ZOO_PREFIX = "zoo://"


@dataclass(frozen=True)
class Resolver:
    suite_file: Path
    zoo_dir: Path | None = None

    def __call__(self, ref: str, field: str = "") -> str:
        if ref.startswith(ZOO_PREFIX):
            if self.zoo_dir is None:
                raise FbhError(f"'{ref}' refers to the zoo but the suite declares no family.zoo",
                               file=str(self.suite_file), field=field, fix="add family.zoo or use a hub id/path")
            rel = ref[len(ZOO_PREFIX):]
            target = (self.zoo_dir / rel).resolve()
            if not target.is_relative_to(self.zoo_dir.resolve()):
                raise FbhError(f"'{ref}' escapes the zoo directory", file=str(self.suite_file), field=field,
                               fix="use a path inside the zoo, without '..'")
            return str(target)
        if ref.startswith(("/", "./", "../")):
            path = Path(ref) if ref.startswith("/") else (self.suite_file.parent / ref)
            return str(path.resolve())
        return ref  # a hub id

    def is_local(self, resolved: str) -> bool:
        return Path(resolved).exists()


def require_local_or_hub(resolved: str, suite_file: Path, field: str) -> None:
    """Hub ids are looked up offline-first; a missing one makes the suite unavailable."""
    if Path(resolved).exists():
        return
    if resolved.startswith("/") or resolved.startswith("."):
        raise SuiteUnavailable(f"'{resolved}' does not exist", file=str(suite_file), field=field,
                               fix="build or download it first")
