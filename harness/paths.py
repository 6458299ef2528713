"""Where fbh keeps things. Every location can be overridden by an environment variable."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout fbh's code runs from


def project_root() -> Path:
    """The project whose suites/, submissions/ and methods/ fbh reads: $FBH_ROOT, else the nearest folder at
    or above the current directory holding both suites/ and methods/ (a checkout of fbh, or a fork of it),
    else the checkout fbh runs from."""
    if os.environ.get("FBH_ROOT"):
        return Path(os.environ["FBH_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "suites").is_dir() and (folder / "methods").is_dir():
            return folder
    return REPO_ROOT


def cache_dir() -> Path:
    """Built zoos and preprocessed test sets: $FBH_CACHE, else ~/.cache/fbh."""
    return Path(os.environ.get("FBH_CACHE") or Path.home() / ".cache" / "fbh")


CACHE_FIX = ("set FBH_CACHE to a folder you can write, on a disk with free space (it holds built zoos and "
             "preprocessed test sets; nothing in the results database was changed)")


def cache_error(exc: OSError, path: Path | str | None = None):
    """One message for an OS error at the cache: the file, what went wrong, and the fix."""
    from harness.errors import FbhError
    where = str(path or exc.filename or cache_dir())
    if exc.errno == errno.ENOSPC:
        return FbhError(f"the disk holding the fbh cache is full ({exc.strerror})", file=where, field="FBH_CACHE",
                        fix="free space, or " + CACHE_FIX)
    if _is_file(cache_dir()):
        return FbhError("the fbh cache path is a file, not a folder", file=str(cache_dir()), field="FBH_CACHE",
                        fix=CACHE_FIX)
    return FbhError(f"cannot write the fbh cache: {exc.strerror or exc}", file=where, field="FBH_CACHE",
                    fix=CACHE_FIX)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long to look up
        return False


def writable_cache() -> Path:
    """The cache folder, created if need be and proven writable (a few bytes written and removed), before
    work that must write it starts; else one FbhError naming it and the fix."""
    root = cache_dir()
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(root))
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise cache_error(exc, exc.filename or root) from None
    return root


def in_cache(path) -> bool:
    """Whether an OSError's filename (a path, or None, bytes or a descriptor number) lies in the cache."""
    return isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(cache_dir().resolve())


def suites_dir() -> Path:
    return Path(os.environ.get("FBH_SUITES_DIR") or project_root() / "suites")


def submissions_dir() -> Path:
    """The submissions a name must be unique among: $FBH_SUBMISSIONS_DIR, else submissions/ here."""
    return Path(os.environ.get("FBH_SUBMISSIONS_DIR") or project_root() / "submissions")


def default_db() -> Path:
    """The results database: $FBH_DB, else .fbh/results.duckdb under the current directory."""
    return Path(os.environ.get("FBH_DB") or Path.cwd() / ".fbh" / "results.duckdb")
