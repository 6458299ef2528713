"""Where fbh keeps things. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Built zoos and preprocessed test sets: $FBH_CACHE, else ~/.cache/fbh."""
    return Path(os.environ.get("FBH_CACHE") or Path.home() / ".cache" / "fbh")


def suites_dir() -> Path:
    return Path(os.environ.get("FBH_SUITES_DIR") or REPO_ROOT / "suites")


def submissions_dir() -> Path:
    """The submissions a name must be unique among: $FBH_SUBMISSIONS_DIR, else submissions/ here."""
    return Path(os.environ.get("FBH_SUBMISSIONS_DIR") or REPO_ROOT / "submissions")


def default_db() -> Path:
    """The results database: $FBH_DB, else .fbh/results.duckdb under the current directory."""
    return Path(os.environ.get("FBH_DB") or Path.cwd() / ".fbh" / "results.duckdb")
