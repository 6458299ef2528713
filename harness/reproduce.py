"""`fbh reproduce`: run a stored run again from what it recorded, and say how far each number moved.

A run stores its planned job (submission, hyperparameters, setting, the point a grid search
selected) and the fingerprint of the inputs it was computed on. Reproducing it checks that
this machine has the same inputs (else there is nothing to compare: the run was computed on
other bytes), runs the job with every logit computed afresh (the outputs cache is not read),
stores nothing, and compares each result row with the stored one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from harness.errors import FbhError
from harness.planner import Job, find_suite
from harness.store import ROW_COLUMNS, Store

ROW_KEY = ("task", "task_split", "condition", "severity", "metric")
REPRODUCIBLE = "kind IN ('submission', 'reference') AND status = 'ok' AND NOT coalesce(superseded, false)"


@dataclass
class RowDifference:
    where: tuple
    stored: float | None
    now: float | None

    @property
    def difference(self) -> float:
        if self.stored is None or self.now is None:
            return float("inf")  # a row that appeared or vanished
        return abs(self.now - self.stored)


@dataclass
class Reproduction:
    run: dict
    rows: list[RowDifference] = field(default_factory=list)
    error: str | None = None

    @property
    def largest(self) -> float:
        return max((r.difference for r in self.rows), default=0.0)


def runs_to_reproduce(store: Store, target: str | None, suite: str | None, sample: int | None,
                      seed: int = 0) -> list[dict]:
    """A run by id; or an entry's latest runs by label (every setting), optionally on one suite;
    or a seeded sample of the stored runs on each suite's current fingerprint."""
    where, params = [REPRODUCIBLE], []
    if suite:
        where.append("suite = ?")
        params.append(suite)
    if target and target.startswith("r") and store.query("SELECT 1 FROM runs WHERE run_id = ?", [target]):
        where, params = ["run_id = ?"], [target]
    elif target:
        where.append("label = ?")
        params.append(target)
    else:
        where.append("fingerprint = (SELECT fingerprint FROM suites s WHERE s.name = runs.suite)")
    runs = store.query(f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY suite, label, setting", params)
    if not runs:
        raise FbhError(f"no stored completed run matches '{target or 'the sample'}'"
                       + (f" on suite '{suite}'" if suite else ""), field="RUN",
                       fix="give a run id or submission name from `fbh leaderboard --format json`")
    if sample is not None and len(runs) > sample:
        runs = sorted(random.Random(seed).sample(runs, sample), key=lambda r: (r["suite"], r["label"], r["setting"]))
    return runs


def stored_job(run: dict) -> Job:
    if not run.get("job"):
        raise FbhError(f"run {run['run_id']} was stored before runs recorded their job", field="RUN",
                       fix="submit it again (fbh submit ... --force); the new run can be reproduced")
    data = json.loads(run["job"])
    return Job(**{**data, "seen": tuple(data["seen"]), "unseen": tuple(data["unseen"])})


def require_same_inputs(run: dict, progress=print) -> Job:
    """The run's job, once this machine is shown to hold the inputs it was computed on (its fingerprint)."""
    from harness.runner import suite_inputs
    job = stored_job(run)
    spec, file = find_suite(job.suite)
    _, on = suite_inputs(spec, file, progress)
    if on.fingerprint != run["fingerprint"]:
        recorded = json.loads(run["inputs"]) if run.get("inputs") else {}
        changed = sorted(k for k in {**recorded, **on.inputs} if recorded.get(k) != on.inputs.get(k)) or ["suite spec"]
        raise FbhError(f"run {run['run_id']} was computed on fingerprint {run['fingerprint']}, this machine has "
                       f"{on.fingerprint} (differs in: {', '.join(changed)})", file=str(file),
                       fix="work where those inputs are (for a zoo: `fbh zoo import` the zoo it was computed on)")
    return job


def reproduce(store: Store, run: dict, device: str = "cpu", progress=print) -> Reproduction:
    """Run one stored run's job again here and compare every result row; stores nothing."""
    from harness.runner import execute_job
    job = require_same_inputs(run, progress)
    result = execute_job(job, device, progress, reuse_outputs=False)
    out = Reproduction(run)
    if result.run.status != "ok":
        out.error = result.run.error
        return out
    stored = {tuple(r[k] for k in ROW_KEY): r["value"]
              for r in store.query(f"SELECT {ROW_COLUMNS} FROM results WHERE run_id = ?", [run["run_id"]])}
    now = {tuple(r[k] for k in ROW_KEY): r["value"] for r in result.rows}
    out.rows = [RowDifference(k, stored.get(k), now.get(k)) for k in sorted({*stored, *now}, key=str)]
    return out
