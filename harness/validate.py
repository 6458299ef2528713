"""`fbh validate`: check suite and submission files without running anything."""

from __future__ import annotations

from pathlib import Path

from harness.errors import FbhError
from harness.spec import load_submission, load_suite, read_yaml


def validate_file(path: Path) -> str:
    """Validate one file; return 'suite' or 'submission'. Raises FbhError on the first problem."""
    from harness.runner import validate_submission
    data = read_yaml(path)
    is_suite = "family" in data or "tasks" in data or Path(path).parent.name == "suites"
    if is_suite:
        from harness.planner import check_suite
        check_suite(load_suite(path), Path(path))
        return "suite"
    sub = load_submission(path)
    validate_submission(sub, str(path))
    if sub.suites:
        from harness.runner import suite_files
        unknown = [s for s in sub.suites if s not in suite_files()]
        if unknown:
            raise FbhError(f"unknown suites {unknown}", file=str(path), field="suites",
                           fix=f"use names from `fbh suites list`: {', '.join(suite_files())}")
    return "submission"
