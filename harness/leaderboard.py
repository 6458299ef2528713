"""Leaderboard tables from the store: references first, then submissions by mean score."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.errors import FbhError
from harness.metrics import DEFAULT_METRIC, higher_is_better
from harness.spec import strip_invisible
from harness.store import Store
from harness.uncertainty import (Difference, average_replicates, interval, paired_difference, rank_label, rank_ranges,
                                 seed_mean, task_replicates)

REFERENCE_ORDER = {"pretrained": 0, "STL": 1, "MTL": 2}
NOT_VERIFIED = "data access not verified"

# Each entry's latest run that nothing superseded, failed or not (a changed submission whose new run
# failed shows that, not its old scores), on one fingerprint; published rows are on every fingerprint. Smoke
# runs (an example limit) are ranked only among smoke runs of the same limit, full runs among full runs. A
# submission run with several seeds has a latest run per seed; table() makes them one entry.
LATEST_RUNS = """
SELECT * FROM (
  SELECT *, row_number() OVER (PARTITION BY kind, label, suite, setting, seed ORDER BY finished_at DESC) AS rn
  FROM runs WHERE suite = ? AND setting = ? AND kind != 'grid_point' AND NOT coalesce(superseded, false)
    AND (kind = 'published' OR fingerprint IS NOT DISTINCT FROM ?) AND example_limit IS NOT DISTINCT FROM ?
) WHERE rn = 1
"""


@dataclass
class Entry:
    kind: str
    label: str
    run_id: str
    method: str | None
    scores: dict[str, float]
    average: float | None
    normalized: float | None
    data_access: str | None = None
    output_kind: str | None = None
    n_parameters: int | None = None
    fusion_seconds: float | None = None
    peak_memory_bytes: int | None = None
    source: str | None = None
    status: str = "ok"
    error: str | None = None
    fingerprint: str | None = None
    # False: the fused result came back as code nobody approved, so what data it read is unproven
    data_access_verified: bool | None = None
    extra: dict = field(default_factory=dict)
    average_ci: tuple[float, float] | None = None   # 95% bootstrap interval of the average (harness.uncertainty)
    rank: str | None = None                         # submissions: 95% range of ranks, '1' or '2-4'

    @property
    def data_access_shown(self) -> str | None:
        if self.data_access_verified is False:
            return f"{self.data_access or '?'} ({NOT_VERIFIED})"
        return self.data_access


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def suite_fingerprint(store: Store, suite: str) -> str | None:
    """The fingerprint a suite's leaderboard ranks on: what its latest submit into this database
    computed on (harness.identity). Rows on any other fingerprint are never ranked with them."""
    rows = store.query("SELECT fingerprint FROM suites WHERE name = ?", [suite])
    return rows[0]["fingerprint"] if rows else None


def other_fingerprints(store: Store, suite: str, fingerprint: str | None) -> list[dict]:
    """Completed runs of the suite on other fingerprints (another zoo build, other hub revisions,
    or recorded before fingerprints were): shown apart, never ranked."""
    return store.query("SELECT fingerprint, count(*) AS runs, max(finished_at) AS latest FROM runs "
                       "WHERE suite = ? AND kind IN ('submission', 'reference') AND status = 'ok' "
                       "AND fingerprint IS DISTINCT FROM ? AND example_limit IS NULL GROUP BY fingerprint "
                       "ORDER BY latest DESC",
                       [suite, fingerprint])


def suite_tasks(store: Store, suite: str) -> list[str]:
    rows = store.query("SELECT task_names FROM suites WHERE name = ?", [suite])
    return json.loads(rows[0]["task_names"]) if rows else []


def task_metrics(store: Store, suite: str) -> dict[str, str]:
    """Task -> its primary metric, from the stored suite spec (accuracy-like when unknown)."""
    rows = store.query("SELECT spec FROM suites WHERE name = ?", [suite])
    tasks = json.loads(rows[0]["spec"])["tasks"] if rows else []
    return {t["name"]: t.get("metric", DEFAULT_METRIC) for t in tasks}


def condition_labels(corruptions: list[dict]) -> dict[str, tuple[str, int | None]]:
    """Label -> (corruption, severity) of a suite spec's corruptions, in its order. A corruption listed at
    one severity is labelled by its name ('jpeg'); one listed at several, by name@severity ('jpeg@1')."""
    pairs = list(dict.fromkeys((c["name"], c.get("severity")) for c in corruptions))
    times = Counter(name for name, _ in pairs)
    return {(name if times[name] == 1 else f"{name}@{severity}"): (name, severity) for name, severity in pairs}


def condition_label(row: dict, labels: dict[str, tuple[str, int | None]]) -> str | None:
    """The label of a result row's (condition, severity) among `labels`, if any. A severity the spec
    leaves out (None) matches any."""
    return next((label for label, (name, severity) in labels.items()
                 if row["condition"] == name and severity in (None, row["severity"])), None)


def resolve_condition(store: Store, suite: str, condition: str) -> tuple[str, int | None]:
    """(condition, severity) of 'clean', a label of condition_labels, or name@severity; a corruption's
    plain name where the suite lists it at several severities is ambiguous."""
    return ("clean", None) if condition == "clean" else _resolve(condition, suite_conditions(store, suite), suite)


def suite_conditions(store: Store, suite: str) -> dict[str, tuple[str, int | None]]:
    rows = store.query("SELECT spec FROM suites WHERE name = ?", [suite])
    return condition_labels(json.loads(rows[0]["spec"]).get("corruptions") or []) if rows else {}


def _resolve(condition: str, labels: dict[str, tuple[str, int | None]], suite: str) -> tuple[str, int | None]:
    if condition in labels:
        return labels[condition]
    name, at, severity = condition.partition("@")
    if at and severity.isdigit() and (name, int(severity)) in labels.values():
        return name, int(severity)
    choices = [label for label, (n, _) in labels.items() if n == condition]
    if choices:
        raise FbhError(f"corruption '{condition}' is listed at several severities in suite '{suite}'",
                       field="--condition", fix=f"name one: {', '.join(choices)}")
    raise FbhError(f"suite '{suite}' has no condition '{condition}'", field="--condition",
                   fix=f"use one of: {', '.join(['clean', *labels])}")


def suite_names(store: Store) -> list[str]:
    """Suites the database knows: stored specs, and suites runs name (a database written by hand may lack specs)."""
    return [r["name"] for r in store.query("SELECT name FROM suites UNION SELECT DISTINCT suite FROM runs ORDER BY 1")]


def suite_settings(store: Store, suite: str) -> dict[str, dict]:
    """Setting name -> its generalization split ({} for 'all'), from the stored suite spec."""
    rows = store.query("SELECT spec FROM suites WHERE name = ?", [suite])
    splits = json.loads(rows[0]["spec"]).get("generalization") or [] if rows else []
    return {"all": {}, **{g["name"]: g for g in splits}}


def resolve_suite(store: Store, suite: str | None) -> str:
    """The suite asked for, or the database's only suite; an unknown name lists the stored ones."""
    names = suite_names(store)
    if suite is None:
        if len(names) == 1:
            return names[0]
        raise FbhError(f"the database holds {len(names)} suites" + (f": {', '.join(names)}" if names else ""),
                       field="--suite", fix="name one with --suite" if names else "run `fbh submit ...` first")
    if suite not in names:
        raise FbhError(f"no results for suite '{suite}' in this database", field="--suite",
                       fix=f"use one of: {', '.join(names)}" if names else "run `fbh submit ...` first")
    return suite


def view(store: Store, suite: str, setting: str = "all", condition: str = "clean", fingerprint: str | None = None,
         limit: int | None = None) -> tuple[list[str], list[Entry]]:
    """What `fbh leaderboard` shows: the table of one setting and condition, checked against the stored
    suite (an unknown setting or condition is an error naming the valid ones); a generalization setting's
    entries carry their seen and unseen averages apart (extra['seen'], extra['unseen'])."""
    settings = suite_settings(store, suite)
    if setting not in settings:
        raise FbhError(f"suite '{suite}' has no setting '{setting}'", field="--setting",
                       fix=f"use one of: {', '.join(settings)}")
    tasks, entries = table(store, suite, setting=setting, condition=condition, fingerprint=fingerprint, limit=limit)
    split = settings[setting]
    if split:
        split_means(entries, split["seen"], split["unseen"])
    return tasks, entries


def relative_to_stl(metric: str, value: float | None, stl: float | None) -> float | None:
    """Score as % of the STL expert's: value / STL for scores, STL / value for errors (lower is better),
    so 100 means 'as good as the expert' and more is better either way; None where undefined (no
    value, no STL, or a zero error)."""
    if value is None or not stl or (not value and not higher_is_better(metric)):
        return None
    return (value / stl if higher_is_better(metric) else stl / value) * 100


def table(store: Store, suite: str, *, setting: str = "all", condition: str = "clean",
          task_split: str | None = None, fingerprint: str | None = None,
          limit: int | None = None) -> tuple[list[str], list[Entry]]:
    """(task columns, entries). A task's column holds its primary metric; extra metrics (pixel accuracy,
    ...) go to entry.extra['metrics'][task][metric]. Normalized score = mean over tasks of the score as
    % of the STL score (FusionBench), inverted for errors. The plain average is given only when every
    task's metric points the same way (all scores, or all errors); otherwise it is None."""
    tasks = suite_tasks(store, suite)
    primary = task_metrics(store, suite)
    condition, severity = resolve_condition(store, suite, condition)
    fingerprint = fingerprint or suite_fingerprint(store, suite)
    runs = store.query(LATEST_RUNS, [suite, setting, fingerprint, limit])
    if limit is not None:  # the paper's rows are on full test sets
        runs = [r for r in runs if r["kind"] != "published"]
    if setting != "all":  # references do not depend on the split; take them from 'all'
        runs += [r for r in store.query(LATEST_RUNS, [suite, "all", fingerprint, limit]) if r["kind"] == "reference"]
    results = store.query(
        "SELECT run_id, task, task_split, metric, value FROM results WHERE condition = ? "
        "AND (?::INTEGER IS NULL OR severity = ?) AND run_id IN (SELECT unnest(?::VARCHAR[]))",
        [condition, severity, severity, [r["run_id"] for r in runs]])
    by_run: dict[str, dict[str, float]] = {}
    extras: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        if task_split is None or r["task_split"] == task_split:
            if r["metric"] == primary.get(r["task"], r["metric"]):
                by_run.setdefault(r["run_id"], {})[r["task"]] = r["value"]
            else:
                extras.setdefault(r["run_id"], {}).setdefault(r["task"], {})[r["metric"]] = r["value"]
    stl = next((by_run.get(r["run_id"], {}) for r in runs if r["label"] == "STL" and r["kind"] == "reference"), {})
    directions = {higher_is_better(primary.get(t, DEFAULT_METRIC)) for t in tasks}
    ascending = directions == {False}  # a suite of errors only ranks its lowest average first
    entries = []
    for group in seed_groups(runs):
        r = group[0]
        scores = _mean_by_key([by_run.get(g["run_id"], {}) for g in group])
        if not scores and r["status"] == "ok":
            continue
        cols = [t for t in tasks if t in scores]
        norm = _mean([relative_to_stl(primary.get(t, DEFAULT_METRIC), scores[t], stl.get(t)) for t in cols])
        average = _mean([scores[t] for t in cols]) if len(directions) == 1 else None
        entries.append(Entry(kind=r["kind"], label=r["label"], run_id=r["run_id"], method=r["method"],
                             scores=scores, average=average, normalized=norm,
                             data_access=r["data_access"], output_kind=r["output_kind"],
                             n_parameters=r["n_parameters"], fusion_seconds=r["fusion_seconds"],
                             peak_memory_bytes=r["peak_memory_bytes"], source=r["source"], status=r["status"],
                             error=r["error"], fingerprint=r["fingerprint"],
                             data_access_verified=r["data_access_verified"],
                             extra={**({"metrics": extras[r["run_id"]]} if r["run_id"] in extras else {}),
                                    **seed_summary(group, by_run, tasks)}))
    kind_rank = {"reference": 0, "published": 1, "submission": 2}
    def rank(e: Entry) -> float:
        if len(directions) > 1:  # mixed scores and errors: rank by the normalized score
            return -(e.normalized if e.normalized is not None else -1e9)
        return (e.average if e.average is not None else 1e9) if ascending \
            else -(e.average if e.average is not None else -1e9)
    entries.sort(key=lambda e: (kind_rank.get(e.kind, 3), e.status != "ok", REFERENCE_ORDER.get(e.label, 9), rank(e),
                                e.label))
    add_uncertainty(store, entries, condition, severity, primary, task_split, higher_better=not ascending)
    return tasks, entries


def seed_groups(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped into entries: one per (kind, label), a submission's seeds together (its latest run of
    each), the group's failed run first so a failure shows rather than the other seeds' mean."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["label"]), []).append(r)
    return [sorted(g, key=lambda r: (r["status"] == "ok", r["seed"] or 0)) for g in groups.values()]


def _mean_by_key(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key -> mean over the dicts that have it all (a task some seed lacks is left out)."""
    keys = [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def seed_summary(group: list[dict], by_run: dict[str, dict[str, float]], tasks: list[str]) -> dict:
    """For several seeds: which, their runs, and the sample standard deviation of their averages."""
    if len(group) < 2:
        return {}
    averages = [_mean([by_run.get(r["run_id"], {}).get(t) for t in tasks]) for r in group]
    known = [a for a in averages if a is not None]
    mean = sum(known) / len(known) if known else None
    std = (sum((a - mean) ** 2 for a in known) / (len(known) - 1)) ** 0.5 if len(known) > 1 else None
    return {"seeds": [r["seed"] for r in group], "seed_runs": [r["run_id"] for r in group], "average_std": std}


def add_uncertainty(store: Store, entries: list[Entry], condition: str, severity: int | None,
                    primary: dict[str, str], task_split: str | None, higher_better: bool) -> None:
    """Each average's 95% interval, and each submission's range of ranks among the submissions (entries
    whose range includes 1 are tied with the leader); see harness.uncertainty."""
    scored = [e for e in entries if e.status == "ok" and e.average is not None]
    reps = task_replicates(store, [r for e in scored for r in seed_runs(e)], condition, severity, primary, task_split)
    averages = {e.run_id: average_replicates(entry_replicates(reps, e), list(e.scores)) for e in scored}
    for e in scored:
        e.average_ci = interval(averages[e.run_id])
    ranked = [e for e in scored if e.kind == "submission"]
    for e, (lo, hi) in zip(ranked, rank_ranges([e.average for e in ranked], [averages[e.run_id] for e in ranked],
                                               higher_better)):
        e.rank = rank_label(lo, hi)


def render(tasks: list[str], entries: list[Entry], fmt: str, about: dict | None = None) -> str:
    """The table as text, CSV or JSON; `about` (suite, setting, condition, fingerprint, ...) heads the JSON.
    Rank is a submission's 95% range of ranks; '95% CI' the average's bootstrap interval."""
    if fmt == "json":
        return json.dumps({**(about or {}), "tasks": tasks, "entries": [_rounded(asdict(e)) for e in entries]},
                          indent=2, default=str)
    extra = extra_columns(entries)
    split_means = [k for k in ("seen", "unseen") if any(k in e.extra for e in entries)]
    header = ["rank", "kind", "label", "method", *tasks, *[f"{t}:{m}" for t, m in extra], "average", "95% CI",
              "seed std",
              *[f"{k} avg" for k in split_means], "normalized", "data", "fusion s"]
    rows = [[e.rank or "", e.kind, shown_label(e), e.method or "",
             *[_fmt(e.scores.get(t)) for t in tasks],
             *[_fmt(e.extra.get("metrics", {}).get(t, {}).get(m)) for t, m in extra],
             _fmt(e.average), _fmt_ci(e.average_ci), _seeds(e), *[_fmt(e.extra.get(k)) for k in split_means],
             _fmt(e.normalized), e.data_access or "", _fmt(e.fusion_seconds)] for e in entries]
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([[csv_cell(c) for c in row] for row in [header, *rows]])
        return buf.getvalue()
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    left = {0, 1, 2, 3, len(header) - 2}
    line = lambda cells: "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def shown_label(e: Entry) -> str:
    label = strip_invisible(e.label)  # rows stored before such characters were refused
    if e.status != "ok":
        return f"{label} (FAILED)"
    return f"{label} ({NOT_VERIFIED})" if e.data_access_verified is False else label


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: it runs a text cell starting with = + - @ (or a tab or CR
    before one) as a formula, so such text is quoted with a leading apostrophe. Numbers stay numbers."""
    if not isinstance(value, str):
        return value
    if value[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(value):
        return "'" + value
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _rounded(value):
    """JSON values to 4 decimals: more than any test set's resolution, less than float noise."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _seeds(e: Entry) -> str:
    std = e.extra.get("average_std")
    return "" if "seeds" not in e.extra else f"{'' if std is None else f'{std:.1f}'} (n={len(e.extra['seeds'])})"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"{ci[0]:.1f}-{ci[1]:.1f}"


def extra_columns(entries: list[Entry]) -> list[tuple[str, str]]:
    """(task, metric) of every extra metric some entry has, in first-seen order."""
    return list(dict.fromkeys((t, m) for e in entries for t, by in e.extra.get("metrics", {}).items() for m in by))


def _fmt(v):
    return "" if v is None else f"{v:.1f}"


def robustness(store: Store, suite: str, conditions: list[str]) -> tuple[list[str], list[Entry]]:
    """The clean table's entries, each with extra['conditions'] = {condition: mean over the same tasks}
    under every corruption, and extra['corrupted_mean'] (FusionBench's robustness table, summarized).
    `conditions` are labels (see resolve_condition): 'jpeg', or 'jpeg@1' and 'jpeg@5' for two severities."""
    tasks, entries = table(store, suite)
    known = suite_conditions(store, suite) if conditions else {}
    labels = {c: _resolve(c, known, suite) for c in conditions}
    rows = store.query("SELECT run_id, condition, severity, task, metric, value FROM results WHERE condition IN "
                       "(SELECT unnest(?::VARCHAR[])) AND run_id IN (SELECT unnest(?::VARCHAR[]))",
                       [[name for name, _ in labels.values()], [e.run_id for e in entries]]) \
        if conditions and entries else []
    primary = task_metrics(store, suite)
    # A mean over tasks is only meaningful when every task's primary metric points the same way.
    comparable = len({higher_is_better(primary.get(t, DEFAULT_METRIC)) for t in tasks}) == 1
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        label = condition_label(r, labels)
        if label is not None and r["metric"] == primary.get(r["task"], r["metric"]):
            scores.setdefault((r["run_id"], label), {})[r["task"]] = r["value"]
    for e in entries:
        by = {c: scores.get((e.run_id, c), {}) for c in conditions}
        e.extra["conditions"] = {c: _mean([by[c].get(t) for t in e.scores]) if by[c] and comparable else None
                                 for c in conditions}
        e.extra["corrupted_mean"] = _mean(list(e.extra["conditions"].values()))
    return tasks, entries


def generalization(store: Store, suite: str, split: str, seen: list[str],
                   unseen: list[str]) -> tuple[list[str], list[Entry]]:
    """Entries of one generalization split (fused from the seen experts), each with extra['seen'] and
    extra['unseen'] = mean score over those tasks; references come from the 'all' setting."""
    tasks, entries = table(store, suite, setting=split)
    split_means(entries, seen, unseen)
    return tasks, entries


def split_means(entries: list[Entry], seen: list[str], unseen: list[str]) -> None:
    for e in entries:
        e.extra["seen"] = _mean([e.scores.get(t) for t in seen])
        e.extra["unseen"] = _mean([e.scores.get(t) for t in unseen])


def compare(store: Store, suite: str, a: str, b: str, *, setting: str = "all", condition: str = "clean",
            fingerprint: str | None = None, limit: int | None = None) -> tuple[Entry, Entry, list[Difference]]:
    """Entry a minus entry b (labels of one leaderboard: submissions or references) on every task both
    have and on their average over those tasks, each with a paired-bootstrap 95% interval and p-value
    (the same resampled test examples for both; harness.uncertainty)."""
    tasks, entries = view(store, suite, setting, condition, fingerprint, limit)
    by_label = {e.label: e for e in entries if e.status == "ok" and e.kind != "published"}
    for label, flag in ((a, "A"), (b, "B")):
        if label not in by_label:
            raise FbhError(f"no completed entry '{label}' on suite '{suite}' (setting {setting}, condition "
                           f"{condition})", field=flag, fix=f"use one of: {', '.join(by_label) or '(none yet)'}")
    ea, eb = by_label[a], by_label[b]
    primary = task_metrics(store, suite)
    name, severity = resolve_condition(store, suite, condition)
    reps = task_replicates(store, [*seed_runs(ea), *seed_runs(eb)], name, severity, primary)
    return ea, eb, differences(tasks, primary, ea, eb, entry_replicates(reps, ea), entry_replicates(reps, eb))


def seed_runs(e: Entry) -> list[str]:
    """The runs an entry stands for: one, or one per seed."""
    return e.extra.get("seed_runs", [e.run_id])


def entry_replicates(reps: dict[str, dict[str, np.ndarray]], e: Entry) -> dict[str, np.ndarray]:
    """Task -> an entry's replicates, from task_replicates of its runs: of several seeds, their mean (each seed
    was scored on the same resampled examples)."""
    return seed_mean([reps.get(r, {}) for r in seed_runs(e)])


def differences(tasks: list[str], primary: dict[str, str], ea: Entry, eb: Entry,
                ra: dict[str, np.ndarray], rb: dict[str, np.ndarray]) -> list[Difference]:
    """compare()'s rows from the two entries' replicates (entry_replicates): the site compares every pair of
    a suite's entries from one load."""
    common = [t for t in tasks if t in ea.scores and t in eb.scores]
    rows = [paired_difference(t, ea.scores[t], eb.scores[t], ra.get(t), rb.get(t)) for t in common]
    if len({higher_is_better(primary.get(t, DEFAULT_METRIC)) for t in common}) == 1 and common:
        rows.append(paired_difference("average", _mean([ea.scores[t] for t in common]),
                                      _mean([eb.scores[t] for t in common]),
                                      average_replicates(ra, common), average_replicates(rb, common)))
    return rows
