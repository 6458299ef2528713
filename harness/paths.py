"""Where fbh keeps things. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
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


def suites_dir() -> Path:
    return Path(os.environ.get("FBH_SUITES_DIR") or project_root() / "suites")


def submissions_dir() -> Path:
    """The submissions a name must be unique among: $FBH_SUBMISSIONS_DIR, else submissions/ here."""
    return Path(os.environ.get("FBH_SUBMISSIONS_DIR") or project_root() / "submissions")


def default_db() -> Path:
    """The results database: $FBH_DB, else .fbh/results.duckdb under the current directory."""
    return Path(os.environ.get("FBH_DB") or Path.cwd() / ".fbh" / "results.duckdb")
