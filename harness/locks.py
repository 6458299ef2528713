"""Inter-process file locks (fcntl), so two fbh processes never build the same thing twice; and the
removal of work folders that dead processes left behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Work folders (a zoo's .partial-PID, a site's .staging-PID-*) that a killed process left behind are
# removed only when the process that named them is gone and they have not changed for STALE_SECONDS:
# a live process's folder is never touched, nor one that a process on another machine sharing the
# folder (whose pid means nothing here) wrote to lately.
STALE_SECONDS = 600
PID_IN_NAME = re.compile(r"\.(?:partial|staging|old|import)-(\d+)(?:[-.]|$)")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale(parent: Path, pattern: str = "*", min_age: float = STALE_SECONDS) -> list[Path]:
    """Remove the entries of parent matching pattern whose name carries the pid of a dead process and that
    have not changed for min_age seconds; returns what was removed."""
    removed = []
    for path in sorted(Path(parent).glob(pattern)):
        match = PID_IN_NAME.search(path.name)
        if match is None or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        try:
            if time.time() - path.lstat().st_mtime < min_age:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove: left as it is
        removed.append(path)
    return removed
