"""User-facing errors: each names the file, the field and the fix."""

from __future__ import annotations


class FbhError(Exception):
    """Bad input from a user. The CLI prints it without a traceback and exits 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 fix: str | None = None):
        self.message = message
        self.file = file
        self.field = field
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}"
            if self.field:
                where += f": field '{self.field}'"
            where += ": "
        elif self.field:
            where = f"field '{self.field}': "
        text = where + self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class SuiteUnavailable(FbhError):
    """A suite's models or data cannot be found on this machine (e.g. no hub access)."""


class MethodFailed(Exception):
    """A fusion method raised or produced an invalid model; fails only its own run."""
