"""Progress of long steps: a bar with an ETA on an interactive terminal, one line per step in logs.

A step reporter is a plain `progress(message)` callable (the CLI's prints to stderr, --quiet's prints
nothing); `Steps` counts steps against it and estimates what is left from the time the done ones took.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[str], None]


def interactive() -> bool:
    return sys.stderr.isatty()


class Steps:
    """`with Steps(n, 'evaluating', progress) as steps: steps.next('digits/clean (500 examples)')` says, per
    step, '[3/10] evaluating digits/clean (500 examples), ETA 12 s'; on a terminal a tqdm bar instead."""

    def __init__(self, total: int, what: str, progress: Progress | None):
        self.total, self.what, self.progress = total, what, progress
        self.done, self.started = 0, time.monotonic()
        self.bar = None
        if progress is not None and interactive() and total > 1:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=what, file=sys.stderr, leave=False, dynamic_ncols=True)

    def next(self, step: str) -> None:
        if self.done:
            self._advance()
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(step, refresh=True)
        elif self.progress is not None:
            eta = self.eta()
            self.progress(f"  [{self.done}/{self.total}] {self.what} {step}" + (f", ETA {eta:.0f} s" if eta else ""))

    def eta(self) -> float | None:
        finished = self.done - 1
        if finished <= 0:
            return None
        return (time.monotonic() - self.started) / finished * (self.total - finished)

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
