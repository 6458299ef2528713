"""Fusion time of shipped submissions on the shrunken tiny-vision suite of the tests.

    FBH_CACHE=... python bench/method_fusion_times.py sce wudi pcb_merging ...

Each named submission (submissions/NAME.yaml; a grid's first point as fixed params) is
submitted once to the shrunken suite of tests/conftest.py (SMALL_RECIPE: three tasks, clean
test sets only, no generalization split, so one job per submission), float32 on the CPU,
into a fresh database; prints each run's status, fusion and evaluation seconds and clean
mean accuracy. The zoo is built into FBH_CACHE once.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def private_suite(root: Path) -> None:
    """The shrunken suite, one job per submission, in a private suites dir, submissions dir and database."""
    from conftest import small_suite_spec
    for folder in ("suites", "submissions"):
        (root / folder).mkdir()
    os.environ.update(FBH_SUITES_DIR=str(root / "suites"), FBH_SUBMISSIONS_DIR=str(root / "submissions"),
                      FBH_DB=str(root / "db.duckdb"))
    spec = small_suite_spec("tiny-small")
    spec.update(corruptions=[], generalization=[], references={"computed": ["pretrained"]})
    (root / "suites" / "tiny-small.yaml").write_text(yaml.safe_dump(spec))


def first_grid_point(stem: str, root: Path) -> str:
    spec = yaml.safe_load((REPO / "submissions" / f"{stem}.yaml").read_text())
    grid = spec.pop("grid", None) or {}
    spec["params"] = {**spec.get("params", {}), **{k: v[0] for k, v in grid.items()}}
    path = root / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def main(stems: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="fbh-fusion-times-"))
    private_suite(root)
    from conftest import SMALL_RECIPE
    from harness import runner
    from harness.store import Store
    from harness.zoo import ensure_built
    ensure_built("tiny_vision", SMALL_RECIPE)
    db = root / "db.duckdb"
    for stem in stems:
        runner.submit(first_grid_point(stem, root), suites=["tiny-small"], db=db, device="cpu", progress=lambda _: None)
    store = Store(db)
    for run in store.query("SELECT * FROM runs ORDER BY label"):
        clean = [r["value"] for r in store.query(
            "SELECT value FROM results WHERE run_id = ? AND condition = 'clean'", [run["run_id"]])]
        print(f"{run['label']:18s} {run['status']:5s} fusion {run['fusion_seconds'] or 0:6.2f} s  "
              f"eval {run['eval_seconds'] or 0:5.2f} s  clean mean {sum(clean) / max(1, len(clean)):5.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
