"""`fbh validate`: check suite and submission files without running anything."""

from __future__ import annotations

from pathlib import Path

from harness.errors import FbhError
from harness.spec import SubmissionSpec, load_submission, load_suite, read_yaml


def name_owners(name: str, path: Path, folder: Path | None = None) -> list[Path]:
    """The other submission files in `folder` (default: the submissions folder) that claim `name`."""
    from harness.paths import submissions_dir
    here = Path(path).resolve()
    owners = []
    for other in sorted((folder or submissions_dir()).glob("*.y*ml")):
        if other.resolve() == here:
            continue
        try:
            data = read_yaml(other)
        except FbhError:
            continue  # a broken file is reported when it is validated itself
        if data.get("name") == name:
            owners.append(other)
    return owners


def check_name_owned(name: str, path: Path, stored_source: str | None = None, folder: Path | None = None) -> None:
    """A submission name belongs to one file: a second file claiming it would silently replace the
    first one's entry. `stored_source`: the file the results database has the name from."""
    owners = name_owners(name, path, folder)
    if stored_source and Path(stored_source).resolve() != Path(path).resolve() and Path(stored_source).is_file():
        try:
            if read_yaml(Path(stored_source)).get("name") == name and Path(stored_source) not in owners:
                owners.append(Path(stored_source))
        except FbhError:
            pass
    if owners:
        raise FbhError(f"submission name '{name}' is already used by {', '.join(map(str, owners))}", file=str(path),
                       field="name", fix="give this submission a name of its own (a name belongs to one file), "
                                         "or edit that file instead")


def validate_submission(sub: SubmissionSpec, file: str):
    """The method exists and every grid point's params fit its schema; its MethodInfo."""
    from harness import registry
    from harness.planner import grid_points
    info = registry.get(sub.method, file=file)
    for point in grid_points(sub):
        info.validate_params(point, file=file, prefix="params" if not sub.grid else "params/grid")
    return info


def validate_file(path: Path) -> str:
    """Validate one file; return 'suite' or 'submission'. Raises FbhError on the first problem."""
    data = read_yaml(path)
    is_suite = "family" in data or "tasks" in data or Path(path).parent.name == "suites"
    if is_suite:
        from harness.planner import check_suite
        check_suite(load_suite(path), Path(path))
        return "suite"
    sub = load_submission(path)
    check_name_owned(sub.name, Path(path))
    validate_submission(sub, str(path))
    if sub.suites:
        from harness.planner import suite_files
        unknown = [s for s in sub.suites if s not in suite_files()]
        if unknown:
            raise FbhError(f"unknown suites {unknown}", file=str(path), field="suites",
                           fix=f"use names from `fbh suites list`: {', '.join(suite_files())}")
    from harness.planner import check_grid_data, default_suites, find_suite
    for name in dict.fromkeys(sub.suites or default_suites()):  # what `fbh submit` checks of the suites it runs
        check_grid_data(sub, find_suite(name)[0], str(path))
    return "submission"
