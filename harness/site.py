"""The static leaderboard site: DuckDB -> HTML pages (Jinja2), CSV downloads and plot data.

Every link is relative and every asset is vendored under assets/, so the site works offline
from file://. Pages carry a Content-Security-Policy that only runs scripts shipped in assets/,
and Jinja2 autoescapes every value, so user text (names, descriptions, URLs) stays text.
Plots are drawn in the browser by the vendored Chart.js from JSON embedded in each page:
matplotlib took 0.1-0.3 s a figure here, too slow for a chart per submission page.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import jinja2
from markupsafe import Markup

from harness import __version__
from harness.errors import FbhError
from harness.leaderboard import (Entry, _mean, condition_label, condition_labels, csv_cell, extra_columns,
                                 generalization, other_fingerprints, relative_to_stl, robustness)
from harness.locks import remove_stale
from harness.metrics import DEFAULT_METRIC, higher_is_better, label as metric_hint
from harness.paths import REPO_ROOT
from harness.site_pages import comparisons, method_page, task_page, write_downloads
from harness.spec import strip_invisible
from harness.store import ROW_COLUMNS, Store

SITE_SOURCES = REPO_ROOT / "site"
MARKER = ".fbh-site"  # the manifest of a build: every file it wrote, which is all a rebuild removes
TOP_ON_INDEX = 3
CHART_SUBMISSIONS = 5  # per-task bar charts: references and the top 5 submissions


# ----------------------------------------------------------------------------- tables

@dataclass
class Column:
    title: str
    numeric: bool = False
    hint: str = ""
    group: str = ""             # 'cost' and 'detail' columns can be hidden together; 'first' stays in view


@dataclass
class Cell:
    text: str
    value: Any = None           # what the browser sorts by and the CSV holds; None sorts last
    href: str | None = None
    hint: str | None = None
    note: str | None = None     # a second line always shown (a published row's source table)
    badge: str | None = None    # a short mark beside the text ('tied', 'within 0.5')


class Row(list):
    """A table row's cells, and the data-* attributes the page's filters read."""

    def __init__(self, cells: Iterable[Cell], **data: str):
        super().__init__(cells)
        self.data = data or getattr(cells, "data", {})


@dataclass
class Table:
    """One sortable HTML table and the CSV file with the same rows. Groups (references, then
    submissions) are sorted separately in the browser, so references stay on top."""
    id: str
    csv_name: str
    columns: list[Column]
    groups: list[tuple[str, list[list[Cell]]]]

    @property
    def rows(self) -> list[list[Cell]]:
        return [row for _, rows in self.groups for row in rows]

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([c.title for c in self.columns])
        writer.writerows([[csv_cell(cell.value if cell.value is not None else "") for cell in row]
                          for row in self.rows])
        return buf.getvalue()


def score(v: float | None) -> Cell:
    return Cell("" if v is None else f"{v:.1f}", None if v is None else round(v, 4))


def seconds(v: float | None) -> Cell:
    return Cell("" if v is None else f"{v:.2f}", None if v is None else round(v, 4))


def mebibytes(v: int | None) -> Cell:
    return Cell("" if v is None else f"{v / 2 ** 20:,.0f}", v)


def count(v: int | None) -> Cell:
    if v is None:
        return Cell("")
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= div:
            return Cell(f"{v / div:.2f}{unit}", v)
    return Cell(str(v), v)


def text(v: Any, href: str | None = None, hint: str | None = None) -> Cell:
    return Cell("" if v is None else str(v), None if v is None else str(v), href, hint)


GROUPS = (("references", "reference"), ("published", "published"), ("submissions", "submission"))


def grouped(entries: list[Entry], row) -> list[tuple[str, list[list[Cell]]]]:
    """Rows in groups the browser sorts apart: computed references, published (paper) rows, submissions."""
    groups = [(name, [Row(row(e)) for e in entries if e.kind == kind]) for name, kind in GROUPS]
    return [(name, rows) for name, rows in groups if rows]


# ----------------------------------------------------------------------------- site model

def slug(value: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("-.") or "x"


@dataclass
class SuitePages:
    """What one suite's pages need, gathered with a fixed number of queries."""
    name: str
    title: str
    description: str
    spec: dict
    tasks: list[str]
    entries: list[Entry]
    conditions: list[str]
    splits: list[dict]
    split_entries: dict[str, list[Entry]]
    runs: dict[str, dict]
    results: dict[str, list[dict]]
    submissions: dict[str, dict]
    failed: list[dict]
    updated: datetime | None
    fingerprint: str | None = None
    expected_fingerprint: str | None = None
    inputs: dict = field(default_factory=dict)
    elsewhere: list[dict] = field(default_factory=list)  # runs on other fingerprints: shown apart, never ranked
    pages: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, label) -> path in the suite dir
    categories: dict[str, str] = field(default_factory=dict)  # method -> its category (merging, ensemble, ...)
    colors: dict[str, str] = field(default_factory=dict)      # entry label -> its colour in every chart
    paper: dict[str, dict] = field(default_factory=dict)       # computed entry label -> paper_differences()

    @property
    def dir(self) -> str:
        return f"suites/{slug(self.name)}"

    def page(self, e: Entry) -> str | None:
        return self.pages.get((e.kind, e.label))

    def task_page(self, task: str) -> str:
        return f"tasks/{slug(task)}.html"

    @property
    def submission_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "submission"]

    @property
    def computed(self) -> list[Entry]:
        """Entries computed here (references and submissions), not numbers copied from a paper."""
        return [e for e in self.entries if e.kind != "published"]

    @property
    def best_merge(self) -> Entry | None:
        """The best submission whose output is one merged model of the base architecture."""
        return next((e for e in self.submission_entries if e.output_kind == "merged"), None)

    def category(self, e: Entry) -> str:
        return self.categories.get(e.method or "", "unknown") if e.kind == "submission" else e.kind

    def tolerance(self, e: Entry) -> float | None:
        run = self.runs.get(e.run_id)
        return run.get("tolerance") if run else e.extra.get("tolerance")

    def models_at_inference(self, e: Entry) -> float | None:
        """Inference cost in models of the base architecture: STL runs one expert per task; otherwise
        the parameters at inference over the pre-trained model's (an ensemble of k experts costs k)."""
        if e.kind == "reference" and e.label == "STL":
            return float(len(self.tasks))
        one = next((r.n_parameters for r in self.entries if r.kind == "reference" and r.label == "pretrained"
                    and r.n_parameters), None) or (self.stl.n_parameters if self.stl else None)
        return None if not one or e.n_parameters is None else e.n_parameters / one

    def parameters_at_inference(self, e: Entry) -> int | None:
        if e.kind == "reference" and e.label == "STL" and e.n_parameters is not None:
            return e.n_parameters * len(self.tasks)
        return e.n_parameters

    def about_reference(self, e: Entry) -> str | None:
        about = REFERENCES.get(e.label) if e.kind == "reference" else None
        return about.format(n=len(self.tasks)) if about else None

    @property
    def metrics(self) -> dict[str, str]:
        """Task -> its primary metric."""
        return {t["name"]: t.get("metric", DEFAULT_METRIC) for t in self.spec.get("tasks", [])}

    def result_order(self, row: dict) -> tuple:
        """Sort key of a result row: the suite's task order, then the primary metric before the extra ones."""
        spec = next((t for t in self.spec.get("tasks", []) if t["name"] == row["task"]), {})
        metrics = [spec.get("metric", DEFAULT_METRIC), *spec.get("extra_metrics", [])]
        return (self.tasks.index(row["task"]) if row["task"] in self.tasks else len(self.tasks), row["task"],
                metrics.index(row["metric"]) if row["metric"] in metrics else len(metrics), row["metric"])

    @property
    def relative_to_stl(self) -> bool:
        """Whether charts plot scores as % of the STL expert instead of raw values: raw values only read
        'higher is better' on one axis when every task's primary metric is a score (not an error)."""
        return not all(higher_is_better(self.metrics.get(t, DEFAULT_METRIC)) for t in self.tasks)

    @property
    def score_title(self) -> str:
        """What a task's (primary) value is, e.g. 'accuracy (%)'."""
        metrics = {self.metrics.get(t, DEFAULT_METRIC) for t in self.tasks}
        return metric_hint(metrics.pop()) if len(metrics) == 1 else "score (each task's primary metric)"

    @property
    def task_value_title(self) -> str:
        """What the per-task charts plot."""
        return f"% of STL ({STL_RATIO})" if self.relative_to_stl else self.score_title

    @property
    def headline_title(self) -> str:
        """What an entry's one-number summary (Pareto y axis, index page) is."""
        return "normalized score (% of STL)" if self.relative_to_stl else f"average {self.score_title}"

    def headline(self, e: Entry) -> float | None:
        return e.normalized if self.relative_to_stl else e.average

    @property
    def stl(self) -> Entry | None:
        return next((e for e in self.entries if e.kind == "reference" and e.label == "STL"), None)

    def task_values(self, e: Entry) -> list[float | None]:
        """What the per-task charts plot for `e`: raw scores, or % of STL (see relative_to_stl)."""
        if not self.relative_to_stl:
            return [e.scores.get(t) for t in self.tasks]
        stl = self.stl.scores if self.stl else {}
        return [_percent_of_stl(self.metrics.get(t, DEFAULT_METRIC), e.scores.get(t), stl.get(t)) for t in self.tasks]


STL_RATIO = "score / STL, STL / error for errors; higher is better"

REFERENCES = {
    "pretrained": "The pre-trained model, not fine-tuned on any task: one model, the floor fusion should beat.",
    "STL": "Single-task learning: one fine-tuned expert per task ({n} models). Each task is scored by its own "
           "expert, so this is the per-task ceiling fusion aims for, not one model.",
    "MTL": "Multi-task learning: one model fine-tuned on every task's training data jointly.",
}


def _percent_of_stl(metric: str, value: float | None, stl: float | None) -> float | None:
    ratio = relative_to_stl(metric, value, stl)
    return None if ratio is None else round(ratio, 3)


def _rows_by(store: Store, sql: str, ids: list[str], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if ids:
        for r in store.query(sql, [ids]):
            out.setdefault(r[key], []).append(r)
    return out


def load_suite(store: Store, row: dict, submissions: dict[str, dict]) -> SuitePages:
    spec = json.loads(row["spec"])
    conditions = list(condition_labels(spec.get("corruptions") or []))  # 'jpeg', or 'jpeg@1', 'jpeg@5'
    tasks, ranked = robustness(store, row["name"], conditions)
    entries = [e for e in ranked if e.status == "ok"]
    splits = spec.get("generalization") or []
    split_ranked = {g["name"]: generalization(store, row["name"], g["name"], g["seen"], g["unseen"])[1]
                    for g in splits}
    split_entries = {name: [e for e in es if e.status == "ok"] for name, es in split_ranked.items()}
    run_ids = [e.run_id for e in entries] + [e.run_id for es in split_entries.values() for e in es]
    runs = {r["run_id"]: r for rs in _rows_by(store, "SELECT * FROM runs WHERE run_id IN "
                                              "(SELECT unnest(?::VARCHAR[]))", run_ids, "run_id").values()
            for r in rs}
    results = _rows_by(store, f"SELECT {ROW_COLUMNS} FROM results WHERE run_id IN (SELECT unnest(?::VARCHAR[])) "
                              "ORDER BY condition, task", run_ids, "run_id")
    # An entry whose latest run failed shows that failure, not an older run's scores.
    failed_ids = [e.run_id for es in [ranked, *split_ranked.values()] for e in es if e.status != "ok"]
    failed = store.query("SELECT label, setting, method, error, finished_at FROM runs WHERE run_id IN "
                         "(SELECT unnest(?::VARCHAR[])) ORDER BY finished_at DESC", [failed_ids]) if failed_ids else []
    updated = store.query("SELECT max(finished_at) AS t FROM runs WHERE suite = ?", [row["name"]])[0]["t"]
    suite = SuitePages(name=row["name"], title=row["title"] or row["name"], description=row["description"] or "",
                       spec=spec, tasks=tasks, entries=entries, conditions=conditions, splits=splits,
                       split_entries=split_entries, runs=runs, results=results, submissions=submissions,
                       failed=failed, updated=updated or row["updated_at"],
                       fingerprint=row.get("fingerprint"), expected_fingerprint=row.get("expected_fingerprint"),
                       inputs=json.loads(row["inputs"]) if row.get("inputs") else {},
                       elsewhere=other_fingerprints(store, row["name"], row.get("fingerprint")))
    if not any(e.kind == "published" for e in entries):
        suite.entries = insert_published(entries, suite_file_published(spec, tasks, suite.stl))
    suite.categories = {name: card["category"] for name, card in registered_method_cards().items()}
    suite.colors = entry_colors([e.label for es in [suite.entries, *split_entries.values()] for e in es])
    suite.paper = paper_differences(suite)
    taken: set[str] = set()
    for e in entries:
        folder = "submissions" if e.kind == "submission" else "references"
        name = slug(e.label)
        while f"{folder}/{name}" in taken:
            name += "-"
        taken.add(f"{folder}/{name}")
        suite.pages[(e.kind, e.label)] = f"{folder}/{name}.html"
    return suite


def suite_file_published(spec: dict, tasks: list[str], stl: Entry | None) -> list[Entry]:
    """The suite file's published (paper) rows for the clean 'all' table, for a database that stores none
    (no submit has run on this suite yet). They are marked as copied from the suite file, never computed."""
    metrics = {t["name"]: t.get("metric", DEFAULT_METRIC) for t in spec.get("tasks", [])}
    rows = [r for r in (spec.get("references") or {}).get("published", [])
            if not r.get("split") and r.get("condition", "clean") == "clean"]
    same_direction = len({higher_is_better(metrics.get(t, DEFAULT_METRIC)) for t in tasks}) == 1
    out = []
    for r in rows:
        scores = {t: v for t, v in r["values"].items() if t in tasks}
        relative = [relative_to_stl(metrics.get(t, DEFAULT_METRIC), v, stl.scores.get(t) if stl else None)
                    for t, v in scores.items()]
        out.append(Entry(kind="published", label=r["label"], run_id=f"suite-file/{r['label']}", method=r.get("method"),
                         scores=scores, average=_mean(list(scores.values())) if same_direction else None,
                         normalized=_mean(relative), source=r.get("source"),
                         extra={"tolerance": r.get("tolerance", 0.5), "suite_file": True}))
    return out


def insert_published(entries: list[Entry], published: list[Entry]) -> list[Entry]:
    """Entries with published rows after the computed references, as leaderboard.table orders them."""
    refs = [e for e in entries if e.kind == "reference"]
    return refs + published + [e for e in entries if e.kind != "reference"]


def registered_method_cards() -> dict[str, dict]:
    """Every registered method's card (harness.registry); a method module that fails to import only
    loses its own card."""
    from harness.registry import method_cards
    return method_cards()[0]


# Tableau 20, darker shade first: distinct on white, and the same order on every page of a suite.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def entry_colors(labels: Iterable[str]) -> dict[str, str]:
    """One colour per entry label, in first-seen order; past the palette, hues a golden angle apart."""
    colors: dict[str, str] = {}
    for label in labels:
        if label not in colors:
            i = len(colors)
            colors[label] = PALETTE[i] if i < len(PALETTE) else _hsl_hex((i * 137.508) % 360, 0.55, 0.45)
    return colors


def _hsl_hex(hue: float, saturation: float, lightness: float) -> str:
    import colorsys
    r, g, b = colorsys.hls_to_rgb(hue / 360, lightness, saturation)
    return "#" + "".join(f"{round(c * 255):02x}" for c in (r, g, b))


def paper_twin(published: Entry, e: Entry) -> bool:
    """Whether computed entry `e` runs what published row `published` reports: the row's `method` when it
    names one, else its label read as a method name ('Task Arithmetic' ~ task_arithmetic) or as a
    reference ('Pre-trained' ~ pretrained, 'Fine-tuned (STL)' ~ STL)."""
    squash = lambda v: re.sub(r"[^a-z0-9]", "", (v or "").lower())  # noqa: E731
    if published.method:
        return e.kind == "submission" and e.method == published.method
    if e.kind == "reference":
        tag = re.search(r"\((STL|MTL)\)", published.label)
        return (tag.group(1) if tag else squash(published.label)) in (e.label, squash(e.label))
    return squash(published.label) == squash(e.method)


def paper_differences(s: SuitePages) -> dict[str, dict]:
    """Computed entry label -> its difference from the paper: mean over the tasks both report of computed
    minus published, and whether every task is within the published row's pinned tolerance."""
    out: dict[str, dict] = {}
    for p in (e for e in s.entries if e.kind == "published"):
        tolerance = s.tolerance(p)
        for e in s.computed:
            common = [t for t in p.scores if t in e.scores]
            if e.label in out or not common or not paper_twin(p, e):
                continue
            diffs = [e.scores[t] - p.scores[t] for t in common]
            out[e.label] = {"paper": p.label, "source": p.source, "difference": sum(diffs) / len(diffs),
                            "largest": max(map(abs, diffs)), "tolerance": tolerance,
                            "within": tolerance is not None and max(map(abs, diffs)) <= tolerance}
    return out


# ----------------------------------------------------------------------------- tables of a suite

def leaderboard_table(s: SuitePages) -> Table:
    metrics = s.metrics
    extra = extra_columns(s.entries)
    paper = s.paper
    columns = [Column("method", group="first"), Column("kind", group="detail"),
               Column("rank", False, "95% range of ranks among the submissions over bootstrap resamples of the "
                                     "test examples; a range that includes 1 is tied with the leader"),
               *[Column(t, True, metric_hint(metrics.get(t))) for t in s.tasks],
               *[Column(f"{t} {m}", True, metric_hint(m)) for t, m in extra],
               Column("average", True, "mean over tasks (only when every task's metric points the same way)"),
               Column("95% CI", True, "95% bootstrap interval of the average (test examples resampled per task)"),
               Column("normalized", True, "mean of score / STL score x 100 (FusionBench); STL / score for errors"),
               *([Column("vs paper", True, "computed minus the published row of the same method, mean over the "
                                           "tasks both report; the badge: every task within the row's tolerance")]
                 if paper else []),
               Column("data access"), Column("category", group="detail"), Column("output", group="detail"),
               Column("fusion s", True, "wall time of the fusion (and grid search)", "cost"),
               Column("peak MiB", True, "peak memory while fusing", "cost"),
               Column("params", True, "parameters at inference (STL: every expert)", "cost"),
               Column("x model", True, "inference cost in models of the base architecture", "cost")]

    def row(e: Entry) -> Row:
        about = s.submissions.get(e.label, {}).get("description") if e.kind == "submission" else \
            (s.about_reference(e) or e.source)
        note = f"published: {e.source}" if e.kind == "published" else None
        if e.extra.get("suite_file"):
            note += " (from the suite file; not run here)"
        return Row([Cell(strip_invisible(e.label), e.label, s.page(e), about, note), text(e.kind), rank_cell(e),
                    *[score(e.scores.get(t)) for t in s.tasks],
                    *[score(e.extra.get("metrics", {}).get(t, {}).get(m)) for t, m in extra],
                    score(e.average), interval_cell(e.average_ci), score(e.normalized),
                    *([paper_cell(paper.get(e.label))] if paper else []),
                    text(e.data_access_shown), text(s.category(e)), text(output_of(s, e)), seconds(e.fusion_seconds),
                    mebibytes(e.peak_memory_bytes), count(s.parameters_at_inference(e)),
                    times(s.models_at_inference(e))],
                   access=e.data_access or "", category=s.category(e), output=e.output_kind or "")

    return Table("leaderboard", "leaderboard.csv", columns, grouped(s.entries, row))


def rank_cell(e: Entry) -> Cell:
    if not e.rank:
        return Cell("")
    tied = e.rank.startswith("1-")
    return Cell(e.rank, int(e.rank.split("-")[0]), hint="tied with the leader: its 95% range of ranks includes 1"
                if tied else None, badge="tied" if tied else None)


def interval_cell(ci: tuple[float, float] | None) -> Cell:
    return Cell("") if ci is None else Cell(f"[{ci[0]:.1f}, {ci[1]:.1f}]", round(ci[0], 4))


def paper_cell(diff: dict | None) -> Cell:
    if diff is None:
        return Cell("")
    return Cell(f"{diff['difference']:+.1f}", round(diff["difference"], 4),
                hint=f"vs '{diff['paper']}' ({diff['source']}); largest task difference {diff['largest']:.2f}",
                badge=f"within {diff['tolerance']:g}" if diff["within"] else None)


def times(v: float | None) -> Cell:
    return Cell("" if v is None else f"{v:.2g}x", None if v is None else round(v, 4))


def output_of(s: SuitePages, e: Entry) -> str | None:
    """What an entry runs at inference, in words; a reference says what it is rather than 'merged'."""
    if e.kind == "reference":
        return {"STL": f"{len(s.tasks)} experts", "pretrained": "base model", "MTL": "one model"}.get(e.label)
    return e.output_kind


def robustness_table(s: SuitePages) -> Table:
    columns = [Column("kind"), Column("method"), Column("clean", True, "mean over tasks, clean test sets"),
               *[Column(c, True, f"mean over tasks under {c}") for c in s.conditions],
               Column("corrupted mean", True, "mean over corruptions")]

    def row(e: Entry) -> list[Cell]:
        by = e.extra.get("conditions", {})
        return [text(e.kind), text(e.label, s.page(e)), score(e.average),
                *[score(by.get(c)) for c in s.conditions], score(e.extra.get("corrupted_mean"))]

    return Table("robustness", "robustness.csv", columns, grouped(s.entries, row))


def generalization_table(s: SuitePages, split: dict) -> Table:
    seen, unseen = split["seen"], split["unseen"]
    columns = [Column("kind"), Column("method"), *[Column(t, True, "seen task") for t in seen],
               Column("seen avg", True), *[Column(t, True, "unseen task") for t in unseen], Column("unseen avg", True)]

    def row(e: Entry) -> list[Cell]:
        return [text(e.kind), text(e.label, s.page(e)),
                *[score(e.scores.get(t)) for t in seen], score(e.extra["seen"]),
                *[score(e.scores.get(t)) for t in unseen], score(e.extra["unseen"])]

    return Table(f"generalization-{slug(split['name'])}", f"generalization-{slug(split['name'])}.csv", columns,
                 grouped(s.split_entries[split["name"]], row))


# ----------------------------------------------------------------------------- plot data

def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower cost x, higher score y), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto_chart(s: SuitePages) -> dict:
    """Headline value (higher is better) vs fusion time of the submissions, references as levels."""
    points = [{"x": e.fusion_seconds, "y": round(s.headline(e), 3), "label": e.label, "color": s.colors[e.label]}
              for e in s.submission_entries if e.fusion_seconds is not None and s.headline(e) is not None]
    return {"type": "pareto", **_front(points), "references": _levels(s), "xTitle": "fusion time (s, log scale)",
            "yTitle": s.headline_title, "xUnit": "s", "yUnit": "% of STL" if s.relative_to_stl else "%"}


def cost_chart(s: SuitePages) -> dict:
    """Headline value vs inference cost in models of the base architecture, references as points too:
    an ensemble of k experts, or STL's expert per task, is not free at inference."""
    points = [{"x": round(x, 4), "y": round(s.headline(e), 3), "label": e.label, "color": s.colors[e.label]}
              for e in s.computed if (x := s.models_at_inference(e)) is not None and s.headline(e) is not None]
    return {"type": "pareto", **_front(points), "references": [],
            "xTitle": "inference cost (x one model: parameters at inference / the pre-trained model's)",
            "yTitle": s.headline_title, "xUnit": "x", "yUnit": "% of STL" if s.relative_to_stl else "%"}


def _front(points: list[dict]) -> dict:
    return {"points": points, "front": [{"x": x, "y": y} for x, y in pareto_front((p["x"], p["y"]) for p in points)]}


def _levels(s: SuitePages) -> list[dict]:
    return [{"label": e.label, "y": round(s.headline(e), 3), "color": s.colors[e.label]} for e in s.entries
            if e.kind != "submission" and s.headline(e) is not None]


def shown_in_charts(s: SuitePages, entries: list[Entry]) -> list[Entry]:
    """References and the top submissions: more bars than that in one group are not legible."""
    return [e for e in entries if e.kind == "reference"] + \
        [e for e in entries if e.kind == "submission"][:CHART_SUBMISSIONS]


def bars(s: SuitePages, labels: list[str], title: str, series: list[tuple[Entry, list[float | None]]]) -> dict:
    return {"type": "bars", "labels": labels, "yTitle": title,
            "series": [{"label": e.label, "values": values, "color": s.colors[e.label]} for e, values in series]}


def task_bars_chart(s: SuitePages, e: Entry | None = None) -> dict:
    """Per-task values of `e` beside the references, or of the references and the top submissions."""
    shown = [e] + [r for r in s.entries if r.kind == "reference" and r.run_id != e.run_id] if e is not None \
        else shown_in_charts(s, s.entries)
    return bars(s, s.tasks, s.task_value_title, [(r, s.task_values(r)) for r in shown])


def robustness_chart(s: SuitePages) -> dict:
    shown = shown_in_charts(s, s.entries)
    return bars(s, ["clean", *s.conditions], f"mean {s.score_title} over tasks",
                [(e, [_round(e.average), *[_round(e.extra.get("conditions", {}).get(c)) for c in s.conditions]])
                 for e in shown])


def generalization_chart(s: SuitePages, split: dict) -> dict:
    shown = shown_in_charts(s, s.split_entries[split["name"]])
    return bars(s, ["seen tasks", "unseen tasks"], f"mean {s.score_title}",
                [(e, [_round(e.extra["seen"]), _round(e.extra["unseen"])]) for e in shown])


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def heat_rows(s: SuitePages) -> list[dict]:
    """Every entry's per-task chart value, each with a shade 0-4 by its place in the task's range:
    a table that stays legible where a chart of every entry would not."""
    values = {e.label: s.task_values(e) for e in s.entries}
    columns = list(zip(*values.values())) if values else []
    ranges = [(min(c), max(c)) if (c := [v for v in col if v is not None]) else (0, 0) for col in columns]
    return [{"entry": e, "cells": [{"value": v, "shade": _shade(v, lo, hi)}
                                   for v, (lo, hi) in zip(values[e.label], ranges)]} for e in s.entries]


def _shade(v: float | None, lo: float, hi: float) -> int | None:
    if v is None:
        return None
    return 4 if hi == lo else min(4, int((v - lo) / (hi - lo) * 5))


# ----------------------------------------------------------------------------- entry pages

def entry_page(s: SuitePages, e: Entry) -> dict:
    run = s.runs[e.run_id]
    rows = s.results.get(e.run_id, [])
    clean = sorted((r for r in rows if r["condition"] == "clean"), key=s.result_order)
    # A task may have several metrics (one row each): the robustness table looks up the clean row's own,
    # under each condition's label (a corruption at two severities is two conditions).
    labels = condition_labels(s.spec.get("corruptions") or [])
    by_task_metric_condition = {(r["task"], r["metric"], label): r["value"] for r in rows
                                if (label := condition_label(r, labels)) is not None}
    conditions = [c for c in s.conditions if any(key[2] == c for key in by_task_metric_condition)]
    params = json.loads(run["params"]) if run.get("params") else {}
    grid = json.loads(run["grid"]) if run.get("grid") else []
    settings = []
    for split in s.splits:
        other = next((x for x in s.split_entries[split["name"]] if x.label == e.label and x.kind == e.kind
                      and x.run_id != e.run_id), None)
        if other is not None:
            settings.append({"split": split, "run": s.runs[other.run_id],
                             "params": json.loads(s.runs[other.run_id]["params"] or "{}"),
                             "results": sorted((r for r in s.results.get(other.run_id, []) if r["condition"] == "clean"),
                                               key=s.result_order),
                             "seen": other.extra["seen"], "unseen": other.extra["unseen"]})
    return {"entry": e, "run": run, "submission": s.submissions.get(e.label) if e.kind == "submission" else None,
            "clean": clean, "conditions": conditions, "robust": by_task_metric_condition, "params": params, "grid": grid,
            "packages": json.loads(run["packages"]) if run.get("packages") else {}, "settings": settings,
            "inputs": json.loads(run["inputs"]) if run.get("inputs") else {},
            "task_chart": task_bars_chart(s, e), "about": s.about_reference(e),
            "paper": s.paper.get(e.label)}


# ----------------------------------------------------------------------------- rendering

def _visible(value: Any) -> Any:
    if isinstance(value, str):
        return Markup(strip_invisible(value)) if isinstance(value, Markup) else strip_invisible(value)
    if isinstance(value, dict):
        return {_visible(k): _visible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_visible(v) for v in value]
    return value


def environment() -> jinja2.Environment:
    # finalize and the JSON policy drop invisible control characters from every value shown, from
    # rows stored before specs refused them (harness.spec.INVISIBLE).
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(SITE_SOURCES / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, finalize=_visible)
    env.policies["json.dumps_function"] = lambda obj, **kw: json.dumps(_visible(obj), **kw)
    env.filters["score"] = lambda v: "" if v is None else f"{v:.1f}"
    env.filters["when"] = lambda v: "" if v is None else f"{v:%Y-%m-%d %H:%M} UTC"
    env.filters["mib"] = lambda v: "" if v is None else f"{v / 2 ** 20:,.0f} MiB"
    env.filters["count"] = lambda v: count(v).text
    env.filters["metric_hint"] = metric_hint
    env.filters["sentence"] = lambda v: v[:1].upper() + v[1:]
    env.filters["slug"] = slug
    env.filters["signed"] = lambda v: "" if v is None else f"{v:+.2f}"
    env.filters["ci"] = lambda v: "" if v is None else f"[{v[0]:.1f}, {v[1]:.1f}]"
    return env


@dataclass
class BuildReport:
    out: Path
    suites: int
    pages: int
    seconds: float


def build(store: Store, out: Path | str) -> BuildReport:
    """Render the whole site into `out`. It is built beside `out` and swapped in, so a failed build
    leaves the previous site intact. A rebuild removes only the files the previous build's manifest
    (MARKER) lists: anything else in `out` (a Pages CNAME, a README) is carried into the new site.
    `out` must be absent, empty, or hold such a manifest; a folder with other files and no manifest is
    refused, as fbh cannot tell what in it is its own."""
    out = Path(out).resolve()
    try:
        return _build(store, out)
    except OSError as exc:  # the folder's disk: full, read-only, or a path through a file
        raise FbhError(f"cannot write the site: {exc.strerror or exc}", file=str(exc.filename or out), field="--out",
                       fix="pass a folder you can write, on a disk with free space; the previous site, if any, "
                           "is unchanged") from None


def _build(store: Store, out: Path) -> BuildReport:
    started = time.perf_counter()
    keep = files_to_keep(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{glob.escape(out.name)}.*")  # work folders of builds whose process died
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    try:
        with store.reading():
            n_pages, n_suites = _render(store, staging)
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir())
        (staging / MARKER).write_text(json.dumps({"written_by": "fbh site build", "files": written}, indent=1))
        carry_over(out, staging, keep)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
            out.rename(old)
            try:
                staging.rename(out)
            except BaseException:
                old.rename(out)  # the previous site back in place
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new site is in place; a later build removes leftovers
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildReport(out, n_suites, n_pages, time.perf_counter() - started)


def files_to_keep(out: Path) -> list[str]:
    """The entries of `out` (relative paths; files, links and empty folders) that its previous build did
    not write: they survive a rebuild. Raises FbhError when `out` is not a folder fbh may build into."""
    if not out.exists():
        return []
    fix = ("pass an empty or new folder: fbh only replaces files its manifest says an earlier `fbh site build` "
           "wrote (a site built by an older fbh has none: remove that folder and build again)")
    if not out.is_dir():
        raise FbhError("the output path exists and is not a folder", file=str(out), field="--out", fix=fix)
    entries = []
    for root, dirs, files in os.walk(out):
        here = Path(root)
        entries += [(here / name).relative_to(out).as_posix() for name in files]
        entries += [(here / name).relative_to(out).as_posix() for name in dirs
                    if (here / name).is_symlink() or not any((here / name).iterdir())]
    if not entries:
        return []
    try:
        manifest = json.loads((out / MARKER).read_text())
        written = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FbhError("the output folder is not empty and holds no manifest of an earlier fbh site build",
                       file=str(out), field="--out", fix=fix) from None
    return sorted(e for e in entries if e != MARKER and e not in written)


def carry_over(out: Path, staging: Path, keep: list[str]) -> None:
    """Put the files to keep into the new build, as hard links (the old folder holds them until the swap)."""
    for rel in keep:
        src, dst = out / rel, staging / rel
        if src.is_dir() and not src.is_symlink():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        if dst.exists() or dst.is_symlink():
            raise FbhError(f"'{rel}' was not written by the earlier build, and this build writes a file there",
                           file=str(out), field="--out", fix=f"move {src} out of the folder, or build elsewhere")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _render(store: Store, out: Path) -> tuple[int, int]:
    env = environment()
    built_at = datetime.now(timezone.utc).replace(tzinfo=None)
    shutil.copytree(SITE_SOURCES / "assets", out / "assets")
    submissions = {r["name"]: r for r in store.query("SELECT name, method, description, authors, url, updated_at "
                                                     "FROM submissions")}
    suites = [load_suite(store, row, submissions)
              for row in store.query("SELECT * FROM suites ORDER BY name")]
    common = {"built_at": built_at, "version": __version__}
    pages = 0

    def write(path: str, template: str, **values) -> None:
        nonlocal pages
        depth = path.count("/")
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(env.get_template(template).render(root="../" * depth, **common, **values))
        pages += 1

    cards = registered_method_cards()
    downloads = write_downloads(store, out / "downloads")
    write("index.html", "index.html", suites=suites, top=TOP_ON_INDEX, cards=cards, downloads=downloads)
    write("about.html", "about.html")
    write("submit.html", "submit.html", suites=suites, example=example_submission())
    for name, card in sorted(cards.items()):
        write(f"methods/{slug(name)}.html", "method.html", **method_page(card, suites))
    for s in suites:
        tables = {"leaderboard": leaderboard_table(s),
                  "robustness": robustness_table(s) if s.conditions else None,
                  "generalization": [(g, generalization_table(s, g)) for g in s.splits]}
        for t in [tables["leaderboard"], tables["robustness"], *[t for _, t in tables["generalization"]]]:
            if t is not None:
                (out / s.dir).mkdir(parents=True, exist_ok=True)
                (out / s.dir / t.csv_name).write_text(t.csv_text(), newline="")
        charts = {"pareto": pareto_chart(s), "cost": cost_chart(s), "tasks": task_bars_chart(s),
                  "robustness": robustness_chart(s) if s.conditions else None,
                  "generalization": {g["name"]: generalization_chart(s, g) for g in s.splits}}
        write(f"{s.dir}/index.html", "suite.html", suite=s, tables=tables, charts=charts, heat=heat_rows(s),
              filters=filter_options(s), cards=cards)
        write(f"{s.dir}/compare.html", "compare.html", suite=s, comparisons=comparisons(store, s))
        for task in s.tasks:
            write(f"{s.dir}/tasks/{slug(task)}.html", "task.html", suite=s, **task_page(s, task))
        for e in s.entries:
            if s.page(e):
                write(f"{s.dir}/{s.page(e)}", "entry.html", suite=s, **entry_page(s, e))
    return pages, len(suites)


def filter_options(s: SuitePages) -> dict[str, list[str]]:
    """The values each filter of a suite page offers: those its submissions have."""
    subs = s.submission_entries
    return {"access": sorted({e.data_access or "" for e in subs}), "category": sorted({s.category(e) for e in subs}),
            "output": sorted({e.output_kind or "" for e in subs})}


def example_submission() -> str:
    """The shipped task arithmetic submission, as the how-to-submit page's example."""
    path = REPO_ROOT / "submissions" / "task_arithmetic.yaml"
    return path.read_text() if path.is_file() else "name: my-merge\nmethod: task_arithmetic\nparams:\n  scaling_factor: 0.3\n"


def preview_server(directory: Path | str, port: int = 8000):
    """An HTTP server for `directory` bound to 127.0.0.1 only: a preview, never a public server."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(directory: Path | str, port: int = 8000, announce=print) -> None:
    with preview_server(directory, port) as server:
        announce(f"serving {directory} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
