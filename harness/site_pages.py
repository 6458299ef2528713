"""The site's pages beyond the leaderboards: a page per method and per task, the pairwise comparison
data, and the downloads of every stored result row. harness.site renders them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.leaderboard import _mean, csv_cell, differences, entry_replicates, seed_runs, task_metrics
from harness.metrics import DEFAULT_METRIC, higher_is_better, label as metric_hint
from harness.store import Store
from harness.uncertainty import average_replicates, paired_differences, task_replicates

if TYPE_CHECKING:
    from harness.site import SuitePages


# ----------------------------------------------------------------------------- method cards

ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})", re.I)
DOI = re.compile(r"\bdoi[: ]\s*(10\.\d{4,9}/\S+)", re.I)
# 'Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.'
CITATION = re.compile(r'(?P<authors>[^"]+?),\s*"(?P<title>[^"]+?),?"\s*,?\s*(?P<venue>[^.]*?)\s*(?P<year>(?:19|20)\d\d)')


def paper_link(reference: str) -> str | None:
    """The paper's address from a citation line: its arXiv abstract, or its DOI."""
    if found := ARXIV.search(reference):
        return f"https://arxiv.org/abs/{found.group(1)}"
    if found := DOI.search(reference):
        return f"https://doi.org/{found.group(1).rstrip('.')}"
    return None


def bibtex(reference: str) -> str | None:
    """A BibTeX entry from a citation line naming authors, a quoted title, a venue and a year; None when
    the line says less (the page then shows the line itself)."""
    found = CITATION.search(reference)
    if not found:
        return None
    authors = re.sub(r"\s+et al\.?$", " and others", found.group("authors").strip())
    first = re.sub(r"[^a-z]", "", authors.split()[0].lower()) or "anon"
    word = next((w for w in re.findall(r"[a-z]+", found.group("title").lower()) if len(w) > 3), "paper")
    fields = {"title": found.group("title").strip(), "author": authors, "year": found.group("year")}
    venue = found.group("venue").strip(" ,")
    kind = "misc"
    if venue:
        kind = "inproceedings"
        fields["booktitle"] = venue
    if arxiv := ARXIV.search(reference):
        fields |= {"eprint": arxiv.group(1), "archivePrefix": "arXiv"}
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items())
    return f"@{kind}{{{first}{found.group('year')}{word},\n{body}\n}}"


def parameter_rows(schema: dict) -> list[dict]:
    """A method's parameters from its JSON schema: name, type, bounds, default, description."""
    rows = []
    for name, prop in schema.get("properties", {}).items():
        bounds = [f"{sign} {prop[key]}" for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                         ("maximum", "<="), ("exclusiveMaximum", "<"))
                  if key in prop]
        if "enum" in prop:
            bounds.append("one of " + ", ".join(map(str, prop["enum"])))
        rows.append({"name": name, "type": _type_name(prop), "bounds": "; ".join(bounds),
                     "default": json.dumps(prop["default"]) if "default" in prop else "(required)",
                     "description": prop.get("description", "")})
    return rows


def _type_name(prop: dict) -> str:
    if "type" in prop:
        item = prop.get("items", {}).get("type")
        return f"{prop['type']} of {item}" if item else prop["type"]
    options = [_type_name(p) for p in prop.get("anyOf", [])]
    return " or ".join(o for o in options if o) or "any"


def method_page(card: dict, suites: list[SuitePages]) -> dict:
    """What a method's page shows: its card, a link and BibTeX for its paper, and every entry that uses it."""
    uses = [{"suite": s, "entry": e} for s in suites for e in s.entries
            if e.kind == "submission" and e.method == card["name"]]
    return {"card": card, "link": paper_link(card.get("reference") or ""),
            "bibtex": bibtex(card.get("reference") or ""), "params": parameter_rows(card.get("params") or {}),
            "uses": uses}


# ----------------------------------------------------------------------------- tasks

def task_page(s: SuitePages, task: str) -> dict:
    """Every entry's clean result on one task (its primary metric), with interval and examples."""
    metric = s.metrics.get(task, DEFAULT_METRIC)
    rows = []
    for e in s.entries:
        if task not in e.scores:
            continue
        stored = next((r for r in s.results.get(e.run_id, []) if r["task"] == task and r["metric"] == metric
                       and r["condition"] == "clean"), {})
        rows.append({"entry": e, "value": e.scores[task], "ci_low": stored.get("ci_low"),
                     "ci_high": stored.get("ci_high"), "n": stored.get("n")})
    chart = {"type": "bars", "labels": [task], "yTitle": _metric_title(metric),
             "series": [{"label": r["entry"].label, "values": [round(r["value"], 3)],
                         "color": s.colors[r["entry"].label]} for r in rows]}
    return {"task": task, "metric": metric, "rows": rows, "task_chart": chart}


def _metric_title(metric: str) -> str:
    return metric_hint(metric)


# ----------------------------------------------------------------------------- comparisons

def comparisons(store: Store, s: SuitePages) -> dict:
    """Paired-bootstrap differences of every pair of the suite's computed entries (clean, all tasks), as
    `fbh compare` gives them: pairs[a][b] = rows of a minus b (COMPARISON_COLUMNS), for a listed before
    b (the page flips the sign for b minus a). Replicates are loaded once; pairs of entries with every task and replicates of
    one length are computed together (harness.uncertainty.paired_differences), the rest one by one."""
    # submissions first, so the page opens on the two leading submissions
    entries = sorted((e for e in s.computed if e.status == "ok"), key=lambda e: e.kind != "submission")
    primary = task_metrics(store, s.name)
    loaded = task_replicates(store, [r for e in entries for r in seed_runs(e)], "clean", None, primary)
    reps = {e.run_id: entry_replicates(loaded, e) for e in entries}
    together = _complete(entries, s.tasks, reps)
    pairs = [(i, j) for i in range(len(entries)) for j in range(i + 1, len(entries))]
    rows = {(i, j): differences(s.tasks, primary, entries[i], entries[j], reps[entries[i].run_id],
                                reps[entries[j].run_id])
            for i, j in pairs if not (i in together and j in together)}
    rows |= _differences_together(s, primary, entries, reps, [(i, j) for i, j in pairs if (i, j) not in rows])
    out: dict[str, dict[str, list[list]]] = {}
    for i, j in pairs:  # a row per task as a list: a suite of a hundred entries has thousands of pairs
        out.setdefault(entries[i].label, {})[entries[j].label] = [
            [d.what, _r(d.a), _r(d.b), _r(d.difference), *(_r(v) for v in (d.ci or (None, None))), _r(d.p_value)]
            for d in rows[(i, j)]]
    return {"entries": [e.label for e in entries], "columns": COMPARISON_COLUMNS, "pairs": out}


COMPARISON_COLUMNS = ["what", "a", "b", "difference", "ci_low", "ci_high", "p"]


def _complete(entries: list, tasks: list[str], reps: dict) -> set[int]:
    """Indices of entries with a score and replicates of one common length on every task."""
    lengths = {i: {len(reps.get(e.run_id, {}).get(t, ())) for t in tasks} for i, e in enumerate(entries)
               if all(t in e.scores for t in tasks)}
    common = {next(iter(n)) for n in lengths.values() if len(n) == 1} - {0}
    return {i for i, n in lengths.items() if len(common) == 1 and n == common} if tasks else set()


def _differences_together(s: SuitePages, primary: dict, entries: list, reps: dict,
                          pairs: list[tuple[int, int]]) -> dict[tuple[int, int], list]:
    """What differences() gives each pair (every task, then the average where the tasks' metrics point one
    way), for pairs of complete entries, a task at a time over all pairs."""
    if not pairs:
        return {}
    first, second = (np.array(side) for side in zip(*pairs))
    used = sorted({*first, *second})
    columns = [(t, {i: entries[i].scores[t] for i in used}, {i: reps[entries[i].run_id][t] for i in used})
               for t in s.tasks]
    if len({higher_is_better(primary.get(t, DEFAULT_METRIC)) for t in s.tasks}) == 1:
        columns.append(("average", {i: _mean([entries[i].scores[t] for t in s.tasks]) for i in used},
                        {i: average_replicates(reps[entries[i].run_id], s.tasks) for i in used}))
    out: dict[tuple[int, int], list] = {pair: [] for pair in pairs}
    for what, values, replicates in columns:
        value = np.array([values.get(i, np.nan) for i in range(len(entries))])
        width = len(next(iter(replicates.values())))
        matrix = np.stack([replicates.get(i, np.zeros(width)) for i in range(len(entries))])
        for pair, d in zip(pairs, paired_differences(what, value[first], value[second], matrix[first], matrix[second])):
            out[pair].append(d)
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


# ----------------------------------------------------------------------------- downloads

DOWNLOAD_SQL = """
SELECT runs.suite, runs.setting, runs.kind, runs.label, runs.method, results.task, results.task_split,
       results.condition, results.severity, results.metric, results.value, results.ci_low, results.ci_high,
       results.n, results.run_id, runs.fingerprint, runs.source, runs.finished_at
FROM results JOIN runs USING (run_id)
WHERE runs.status = 'ok' AND runs.kind IN ('submission', 'reference', 'published')
ORDER BY runs.suite, runs.setting, runs.kind, runs.label, results.condition, results.severity, results.task,
         results.metric, results.run_id
"""
DOWNLOADS = ("results.csv", "results.json", "results.parquet", "results.duckdb")


def write_downloads(store: Store, folder: Path) -> list[str]:
    """Every stored result row of a completed run (each with its interval, n, run id and fingerprint; not
    its bootstrap replicates) as CSV, JSON and Parquet, and a copy of the whole database."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = store.query(DOWNLOAD_SQL)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([[_csv_cell(r[c]) for c in COLUMNS] for r in rows])
    (folder / "results.json").write_text(json.dumps(rows, default=_json_default, indent=1))
    with store.connect(read_only=True) as con:
        con.execute(f"COPY ({DOWNLOAD_SQL}) TO '{_sql_path(folder / 'results.parquet')}' (FORMAT parquet)")
        con.execute(f"ATTACH '{_sql_path(folder / 'results.duckdb')}' AS download (READ_ONLY false)")
        try:
            con.execute(f"COPY FROM DATABASE {_database_name(con)} TO download")
        finally:
            con.execute("DETACH download")
    return list(DOWNLOADS)


COLUMNS = ["suite", "setting", "kind", "label", "method", "task", "task_split", "condition", "severity", "metric",
           "value", "ci_low", "ci_high", "n", "run_id", "fingerprint", "source", "finished_at"]


def _csv_cell(value: Any) -> Any:
    return "" if value is None else csv_cell(value)


def _json_default(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _database_name(con) -> str:
    return con.execute("SELECT current_database()").fetchone()[0]
