"""Time `fbh site build` on a synthetic database of many suites x many submissions.

    python bench/site_build.py [--suites 10] [--submissions 100] [--keep DIR]

The rows are random but shaped like real ones (references, a published row, a generalization
split, seven corruptions, bootstrap intervals); they are bulk-loaded through pyarrow so the
fill takes seconds. Prints the fill time, the build's wall and CPU time, and the site's size.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa

from harness.site import build
from harness.store import RESULT_COLUMNS, RUN_COLUMNS, Run, Store

TASKS = ["digits", "shapes", "textures", "colors", "counting", "position", "orientation", "svhn"]
CORRUPTIONS = ["motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast", "jpeg"]
SPLIT = {"name": "six-seen-two-unseen", "seen": TASKS[:6], "unseen": TASKS[6:]}
METHODS = ["task_arithmetic", "ties_merging", "simple_average", "simple_ensemble"]
REPLICATES = 1000  # harness.evaluate.BOOTSTRAP_SAMPLES


def suite_spec(i: int) -> dict:
    return {"name": f"suite-{i:02d}", "title": f"Synthetic suite {i}", "description": "Benchmark rows for timing.",
            "family": {"kind": "clip_vision", "base": "zoo://pretrained", "experts": {t: t for t in TASKS}},
            "tasks": [{"name": t, "dataset": t} for t in TASKS],
            "corruptions": [{"name": c, "severity": 3} for c in CORRUPTIONS], "generalization": [SPLIT]}


def fill(store: Store, n_suites: int, n_submissions: int, rng: random.Random) -> None:
    runs, results = [], []
    t0 = datetime(2025, 1, 1)

    def add(run: Run, conditions: list[str], split: dict | None = None) -> None:
        run.finished_at = t0 + timedelta(minutes=len(runs))
        runs.append(run.values())
        for condition in conditions:
            for task in TASKS:
                value = rng.uniform(20, 99) * (0.8 if condition != "clean" else 1.0)
                task_split = "unseen" if split and task in split["unseen"] else "seen"
                # clean rows carry bootstrap replicates as real runs do (intervals, ranks, comparisons)
                replicates = [value + rng.gauss(0, 1.3) for _ in range(REPLICATES)] if condition == "clean" else None
                results.append([run.run_id, task, task_split, condition, None if condition == "clean" else 3,
                                "accuracy", value, 500, value - 2.5, value + 2.5, replicates])

    for name in (f"sub-{j:03d}" for j in range(n_submissions)):
        store.upsert_submission({"name": name, "method": rng.choice(METHODS), "description": f"Submission {name}",
                                 "authors": "Bench", "url": "https://example.org/" + name}, name, None)
    for i in range(n_suites):
        spec = suite_spec(i)
        store.upsert_suite(spec, f"hash{i}")
        for label in ("pretrained", "STL", "MTL"):
            add(Run(run_key=f"{i}-{label}", kind="reference", label=label, suite=spec["name"],
                    n_parameters=5_000_000, output_kind="merged", data_access="n/a"), ["clean", *CORRUPTIONS])
        add(Run(run_key=f"{i}-pub", kind="published", label="Published row", suite=spec["name"],
                source="Some paper, Table 3"), ["clean"])
        for j in range(n_submissions):
            common = dict(kind="submission", label=f"sub-{j:03d}", submission=f"sub-{j:03d}", suite=spec["name"],
                          method=rng.choice(METHODS), params={"scaling_factor": 0.3},
                          grid=[{"params": {"scaling_factor": s}, "validation_mean": rng.uniform(40, 90)}
                                for s in (0.1, 0.3, 0.5)],
                          data_access="none", output_kind="merged", n_parameters=5_000_000, seed=0,
                          device="cpu", git_commit="0" * 40, packages={"torch": "2.13.0"},
                          fusion_seconds=rng.uniform(0.1, 100), peak_memory_bytes=rng.randint(2 ** 28, 2 ** 33))
            add(Run(run_key=f"{i}-{j}-all", setting="all", **common), ["clean", *CORRUPTIONS])
            add(Run(run_key=f"{i}-{j}-split", setting=SPLIT["name"], **common), ["clean"], SPLIT)
    run_table = pa.table({c: pa.array([r[k] for r in runs]) for k, c in enumerate(RUN_COLUMNS)})
    cols = ["run_id", *RESULT_COLUMNS]
    result_table = pa.table({c: pa.array([r[k] for r in results]) for k, c in enumerate(cols)})
    with store.transaction() as con:
        con.register("run_rows", run_table)
        con.register("result_rows", result_table)
        con.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) SELECT * FROM run_rows")
        con.execute(f"INSERT INTO results ({', '.join(cols)}) SELECT * FROM result_rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", type=int, default=10)
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="build the site here instead of a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        t = time.perf_counter()
        fill(store, args.suites, args.submissions, random.Random(0))
        print(f"filled {store.counts()} in {time.perf_counter() - t:.1f} s")
        cpu = time.process_time()
        report = build(store, args.keep or Path(tmp) / "site")
        cpu = time.process_time() - cpu
        size = sum(f.stat().st_size for f in report.out.rglob("*") if f.is_file())
        print(f"built {report.pages} pages for {report.suites} suites in {report.seconds:.2f} s wall, "
              f"{cpu:.2f} s CPU ({size / 2 ** 20:.1f} MiB) -> {report.out}")


if __name__ == "__main__":
    main()
