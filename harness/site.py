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
from harness.leaderboard import (Entry, condition_label, condition_labels, csv_cell, extra_columns,
                                 generalization, other_fingerprints, relative_to_stl, robustness)
from harness.locks import remove_stale
from harness.paths import REPO_ROOT
from harness.metrics import DEFAULT_METRIC, higher_is_better, label as metric_hint
from harness.spec import strip_invisible
from harness.store import ROW_COLUMNS, Store

SITE_SOURCES = REPO_ROOT / "site"
MARKER = ".fbh-site"  # the manifest of a build: every file it wrote, which is all a rebuild removes
TOP_ON_INDEX = 3
RADAR_SUBMISSIONS = 5


# ----------------------------------------------------------------------------- tables

@dataclass
class Column:
    title: str
    numeric: bool = False
    hint: str = ""


@dataclass
class Cell:
    text: str
    value: Any = None           # what the browser sorts by and the CSV holds; None sorts last
    href: str | None = None
    hint: str | None = None


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


def grouped(entries: list[Entry], row) -> list[tuple[str, list[list[Cell]]]]:
    refs = [row(e) for e in entries if e.kind != "submission"]
    subs = [row(e) for e in entries if e.kind == "submission"]
    return [(name, rows) for name, rows in (("references", refs), ("submissions", subs)) if rows]


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

    @property
    def dir(self) -> str:
        return f"suites/{slug(self.name)}"

    def page(self, e: Entry) -> str | None:
        return self.pages.get((e.kind, e.label))

    @property
    def submission_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "submission"]

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
    taken: set[str] = set()
    for e in entries:
        folder = "submissions" if e.kind == "submission" else "references"
        name = slug(e.label)
        while f"{folder}/{name}" in taken:
            name += "-"
        taken.add(f"{folder}/{name}")
        suite.pages[(e.kind, e.label)] = f"{folder}/{name}.html"
    return suite


# ----------------------------------------------------------------------------- tables of a suite

def leaderboard_table(s: SuitePages) -> Table:
    metrics = s.metrics
    extra = extra_columns(s.entries)
    columns = [Column("kind"), Column("method"), *[Column(t, True, metric_hint(metrics.get(t))) for t in s.tasks],
               *[Column(f"{t} {m}", True, metric_hint(m)) for t, m in extra],
               Column("average", True, "mean over tasks (only when every task's metric points the same way)"),
               Column("normalized", True, "mean of score / STL score x 100 (FusionBench); STL / score for errors"),
               Column("data access"), Column("output"),
               Column("fusion s", True, "wall time of the fusion (and grid search)"),
               Column("peak MiB", True, "peak memory while fusing"),
               Column("params", True, "parameters at inference")]

    def row(e: Entry) -> list[Cell]:
        about = s.submissions.get(e.label, {}).get("description") if e.kind == "submission" else e.source
        return [text(e.kind), text(e.label, s.page(e), about),
                *[score(e.scores.get(t)) for t in s.tasks],
                *[score(e.extra.get("metrics", {}).get(t, {}).get(m)) for t, m in extra],
                score(e.average), score(e.normalized),
                text(e.data_access_shown), text(e.output_kind), seconds(e.fusion_seconds),
                mebibytes(e.peak_memory_bytes), count(e.n_parameters)]

    return Table("leaderboard", "leaderboard.csv", columns, grouped(s.entries, row))


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
    points = [{"x": e.fusion_seconds, "y": round(s.headline(e), 3), "label": e.label}
              for e in s.submission_entries if e.fusion_seconds is not None and s.headline(e) is not None]
    front = pareto_front((p["x"], p["y"]) for p in points)
    references = [{"label": e.label, "y": round(s.headline(e), 3)} for e in s.entries
                  if e.kind != "submission" and s.headline(e) is not None]
    return {"type": "pareto", "points": points, "front": [{"x": x, "y": y} for x, y in front],
            "references": references, "xTitle": "fusion time (s, log scale)", "yTitle": s.headline_title,
            "yUnit": "% of STL" if s.relative_to_stl else "%"}


def radar_chart(s: SuitePages) -> dict:
    shown = [e for e in s.entries if e.kind == "reference"] + s.submission_entries[:RADAR_SUBMISSIONS]
    return {"type": "radar", "labels": s.tasks, "valueTitle": s.task_value_title,
            "series": [{"label": e.label, "values": s.task_values(e)} for e in shown]}


def task_bars_chart(s: SuitePages, e: Entry) -> dict:
    shown = [e] + [r for r in s.entries if r.kind == "reference" and r.run_id != e.run_id]
    return {"type": "bars", "labels": s.tasks, "yTitle": s.task_value_title,
            "series": [{"label": r.label, "values": s.task_values(r)} for r in shown]}


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
            "task_chart": task_bars_chart(s, e)}


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

    write("index.html", "index.html", suites=suites, top=TOP_ON_INDEX)
    for s in suites:
        tables = {"leaderboard": leaderboard_table(s),
                  "robustness": robustness_table(s) if s.conditions else None,
                  "generalization": [(g, generalization_table(s, g)) for g in s.splits]}
        for t in [tables["leaderboard"], tables["robustness"], *[t for _, t in tables["generalization"]]]:
            if t is not None:
                (out / s.dir).mkdir(parents=True, exist_ok=True)
                (out / s.dir / t.csv_name).write_text(t.csv_text(), newline="")
        write(f"{s.dir}/index.html", "suite.html", suite=s, tables=tables,
              charts={"pareto": pareto_chart(s), "radar": radar_chart(s)})
        for e in s.entries:
            write(f"{s.dir}/{s.page(e)}", "entry.html", suite=s, **entry_page(s, e))
    return pages, len(suites)


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
