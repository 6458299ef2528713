"""Warm-submit wall time, split by stage: what one `fbh submit` of a method costs once the
zoo is built, the evaluation tensors are cached and the references are stored.

    FBH_CACHE=/tmp/fbhcache python bench/submit.py [--suite tiny-vision] \
        [--submission submissions/task_arithmetic.yaml] [--repeat 2]

A first, untimed `submit` into a private DB (under --workdir) builds the zoo if needed,
fills the evaluation cache and stores the references. Each timed run then re-submits
with force=True (the references stay stored, as on a leaderboard) in a fresh Python
process on a copy of that DB, so the imports are counted as a real `fbh submit` pays
them. Stages (seconds, summed over the submission's runs):

- imports: the harness and the libraries it imports before working
- load: opening the suite (family, template model)
- validate: the method registry and the params check
- inputs: what the fusion process is handed (harness.isolation.write_inputs): the base,
  the experts, the declared examples and the family's kit, written to its folder
- fuse: the rest of the fusion process: starting it (overlapping the inputs), the method,
  its result read back
- build: the fused result made a runnable model (harness.evaluate.as_predictor)
- evaluate: every task, condition and setting, bootstrap intervals included
- store: DuckDB (opening, planning queries, writing the runs)
- other: what is left (planning, provenance)

It also prints a digest of the stored result rows of the submission, so a speed change
can be checked to leave every value bit-identical (the digest must not move).

With --cached the timed runs re-submit without force: every run is answered from the store,
so the time is what an unchanged re-submit costs (imports, planning with the methods' code
identities, the store). The worker then imports and times only what `fbh submit` does; the
methods (torch) are imported only if the methods' index is stale (harness.registry.code_identity).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, run_worker, write_result  # noqa: E402

RESULTS = """
SELECT r.setting, x.task, x.task_split, x.condition, x.severity, x.metric, x.value, x.n, x.ci_low, x.ci_high
FROM runs r JOIN results x USING (run_id)
WHERE r.run_id IN (SELECT unnest(?::VARCHAR[]))
ORDER BY ALL
"""


def rows_digest(db: str, run_ids: list[str]) -> tuple[str, int]:
    """sha256 over the exact (repr) values of every stored result row of these runs."""
    from harness.store import Store
    rows = Store(db).query(RESULTS, [run_ids])
    text = "\n".join(repr(tuple(r.values())) for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16], len(rows)


# ----------------------------------------------------------------------------- worker

def worker(args) -> None:
    from harness import runner, store
    if not args.cached:  # an unchanged re-submit needs no harness.evaluate, hence no torch
        from harness import evaluate
    stages: dict[str, float] = {"imports": time.perf_counter() - T_PROCESS}

    active: list[str] = []  # stages being timed, innermost last: each second counts for the innermost only

    def timed(stage: str, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            active.append(stage)
            try:
                return fn(*a, **kw)
            finally:
                active.pop()
                spent = time.perf_counter() - start
                stages[stage] = stages.get(stage, 0.0) + spent
                if active:
                    stages[active[-1]] = stages.get(active[-1], 0.0) - spent
        return wrapper

    runner.open_suite = timed("load", runner.open_suite)
    runner.validate_submission = timed("validate", runner.validate_submission)
    runner.isolated_fuse = timed("fuse", runner.isolated_fuse)
    if not args.cached:
        from harness import isolation
        isolation.write_inputs = timed("inputs", isolation.write_inputs)
    if not args.cached:
        evaluate.as_predictor = timed("build", evaluate.as_predictor)
        evaluate.evaluate = timed("evaluate", evaluate.evaluate)
    for name in ("__init__", "completed_keys", "write_run", "upsert_submission", "upsert_suite", "completed_run",
                 "query"):
        setattr(store.Store, name, timed("store", getattr(store.Store, name)))
    start = time.perf_counter()
    report = runner.submit(args.submission, suites=[args.suite], db=args.db, force=not args.cached,
                           progress=lambda _: None)
    total = time.perf_counter() - start
    failed = [o.label for o in report.failed]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    if args.cached and any(o.status != "cached" for o in report.outcomes):
        raise SystemExit(f"--cached, yet runs were computed: {[(o.label, o.setting) for o in report.outcomes]}")
    stages["other"] = total - sum(v for k, v in stages.items() if k != "imports")
    stages["total"] = total + stages["imports"]
    write_result(args.result, stages=stages, run_ids=[o.run_id for o in report.outcomes if o.status == "ok"])


# ----------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--suite", default="tiny-vision")
    ap.add_argument("--submission", default=str(REPO / "submissions" / "task_arithmetic.yaml"))
    ap.add_argument("--repeat", type=int, default=1, help="timed fresh-process submits (fastest reported)")
    ap.add_argument("--cached", action="store_true", help="time unchanged re-submits (all runs from the store)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fbh-bench-submit")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from harness import runner
    args.workdir.mkdir(parents=True, exist_ok=True)
    warm_db = args.workdir / f"{args.suite}.duckdb"
    print(machine())
    t0 = time.perf_counter()
    runner.submit(args.submission, suites=[args.suite], db=str(warm_db), progress=lambda _: None)
    print(f"warm-up submit (zoo, evaluation cache, references; stored runs reused): {time.perf_counter() - t0:.1f} s")

    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            db = Path(tmp) / "copy.duckdb"
            shutil.copy(warm_db, db)
            t0 = time.perf_counter()
            r = run_worker(Path(__file__), ["--suite", args.suite, "--submission", args.submission, "--db", str(db),
                                            *(["--cached"] if args.cached else [])])
            r["stages"]["process wall"] = time.perf_counter() - t0
            r["digest"], r["rows"] = rows_digest(str(db), r["run_ids"])
        runs.append(r)
        print(f"run {i + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()), flush=True)
    best = min(runs, key=lambda r: r["stages"]["total"])
    print(f"\nwarm submit of {Path(args.submission).name} on {args.suite} (fastest of {args.repeat}), seconds:")
    for k, v in best["stages"].items():
        print(f"  {k:13s} {v:7.2f}")
    digests = {r["digest"] for r in runs}
    print(f"results: {best['rows']} rows, digest {', '.join(sorted(digests))}"
          + ("" if len(digests) == 1 else "  (runs DISAGREE)"))
    print(json.dumps({"load average": __import__("os").getloadavg()}))


if __name__ == "__main__":
    main()
