"""`fbh site build` from a database filled by real runs on the shrunken tiny-vision suite, checked
as files and in headless Chromium (Debian's; Playwright drives it but never downloads a browser)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import urllib.request
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner

from conftest import REPO, SMALL_TASKS
from harness.cli import main
from harness.errors import FbhError
from harness.leaderboard import table
from harness.site import Table, Cell, Column, pareto_front, preview_server, slug
from harness.store import Run, Store

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
CHROMIUM = os.environ.get("FBH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def fbh(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- pure helpers

def test_pareto_front_keeps_points_nothing_beats():
    points = [(1.0, 50.0), (2.0, 40.0), (3.0, 70.0), (3.0, 60.0), (5.0, 70.0), (0.5, 30.0)]
    assert pareto_front(points) == [(0.5, 30.0), (1.0, 50.0), (3.0, 70.0)]
    assert pareto_front([]) == []


def test_slug_and_csv_keep_user_text_inert():
    assert slug("Made-up paper row") == "made-up-paper-row"
    assert slug("../../etc/passwd") == "etc-passwd"
    t = Table("t", "t.csv", [Column("label"), Column("score", True)],
              [("submissions", [[Cell("=cmd()", "=cmd()"), Cell("-1.0", -1.0)]])])
    assert list(csv.reader(io.StringIO(t.csv_text()))) == [["label", "score"], ["'=cmd()", "-1.0"]]


def test_builds_a_suite_without_runs_and_lists_failed_runs_as_text(tmp_path):
    from conftest import small_suite_spec
    from harness.site import build
    from harness.store import Run
    store = Store(tmp_path / "db.duckdb")
    store.upsert_suite(small_suite_spec(), "h")
    store.write_run(Run(run_key="k", kind="submission", label="broken", suite="tiny-small", status="failed",
                        error="ValueError: <script>alert(1)</script>"), [])
    report = build(store, tmp_path / "out")
    assert report.suites == 1 and (tmp_path / "out" / "suites" / "tiny-small" / "compare.html").is_file()
    assert not (tmp_path / "out" / "suites" / "tiny-small" / "submissions").exists()  # nothing computed: no entry page
    suite = (tmp_path / "out" / "suites" / "tiny-small" / "index.html").read_text()
    assert "Failed runs" in suite and "&lt;script&gt;alert(1)&lt;/script&gt;" in suite and "<script>alert" not in suite
    # The suite file's paper row is on the page although no submit stored it, marked as not run here.
    rows = read_csv(tmp_path / "out" / "suites" / "tiny-small" / "leaderboard.csv")
    assert [(r["method"], r["kind"]) for r in rows] == [("Made-up paper row", "published")]
    assert "test fixture, Table 0 (from the suite file; not run here)" in suite
    (tmp_path / "file").write_text("x")
    with pytest.raises(FbhError):
        build(store, tmp_path / "file")


# ----------------------------------------------------------------------------- chart data, from stored rows

def chart_data(page: Path, chart_id: str) -> dict:
    """The JSON a page embeds for one of its charts (what site.js hands Chart.js)."""
    found = re.search(rf'<script type="application/json" id="{chart_id}-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(found.group(1))


class _TableText(HTMLParser):
    """The cell texts of one table, row by row."""
    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data.strip()


def table_text(page: Path, table_id: str) -> list[list[str]]:
    parser = _TableText(table_id)
    parser.feed(page.read_text())
    return parser.rows


def stored_suite(store: Store, name: str, tasks: dict[str, list[str]], runs: dict[tuple[str, str], dict],
                 corruptions: tuple[str, ...] = ()) -> None:
    """A suite (task -> [primary metric, extra metrics...]) and finished runs ((kind, label) -> {"fusion": seconds,
    (task, metric[, condition]): value}) written straight to the store, so chart data is checked without models."""
    store.upsert_suite({"name": name, "title": name, "corruptions": [{"name": c} for c in corruptions],
                        "tasks": [{"name": t, "metric": ms[0], "extra_metrics": ms[1:]} for t, ms in tasks.items()]},
                       "h")
    for (kind, label), values in runs.items():
        rows = [{"task": key[0], "metric": key[1], "condition": key[2] if len(key) == 3 else "clean",
                 "task_split": "seen", "value": value, "n": 10} for key, value in values.items() if key != "fusion"]
        store.write_run(Run(run_key=f"{name}/{label}", kind=kind, label=label, suite=name,
                            fusion_seconds=values.get("fusion"), finished_at=datetime(2026, 1, 1)), rows)


NYUV2_LIKE = {"segmentation": ["miou", "pixel_accuracy"], "depth": ["abs_err", "rel_err"], "normal": ["mean_angle"]}


def nyuv2_like_runs() -> dict:
    def run(seg, pixel_acc, depth, rel, normal, fusion=None, corrupted=()):
        return {("segmentation", "miou"): seg, ("segmentation", "pixel_accuracy"): pixel_acc,
                ("depth", "abs_err"): depth, ("depth", "rel_err"): rel, ("normal", "mean_angle"): normal,
                "fusion": fusion, **dict(corrupted)}
    return {("reference", "pretrained"): run(10.0, 30.0, 80.0, 40.0, 50.0),
            ("reference", "STL"): run(50.0, 70.0, 40.0, 15.0, 25.0),
            ("submission", "fast"): run(40.0, 65.0, 50.0, 18.0, 30.0, fusion=2.0, corrupted={
                ("segmentation", "miou", "gaussian_noise"): 30.0,
                ("segmentation", "pixel_accuracy", "gaussian_noise"): 61.0,
                ("depth", "abs_err", "gaussian_noise"): 60.0, ("depth", "rel_err", "gaussian_noise"): 21.0}),
            ("submission", "slow"): run(45.0, 68.0, 44.0, 16.0, 27.0, fusion=10.0)}


def test_charts_of_a_mixed_direction_suite_plot_percent_of_stl(tmp_path):
    """Scores and errors on one chart only compare as % of the STL expert (higher is better for both);
    the Pareto chart, with no plain average to plot, uses the normalized score."""
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    stored_suite(store, "nyu-like", NYUV2_LIKE, nyuv2_like_runs(), corruptions=("gaussian_noise",))
    build(store, tmp_path / "out")
    suite = tmp_path / "out" / "suites" / "nyu-like"
    _, entries = table(store, "nyu-like")
    normalized = {e.label: e.normalized for e in entries}

    per_task = chart_data(suite / "index.html", "tasks")
    assert per_task["labels"] == ["segmentation", "depth", "normal"] and "% of STL" in per_task["yTitle"]
    values = {s["label"]: s["values"] for s in per_task["series"]}
    assert values["STL"] == [100, 100, 100]
    assert values["fast"] == pytest.approx([40 / 50 * 100, 40 / 50 * 100, 25 / 30 * 100], abs=1e-3)
    assert values["pretrained"] == pytest.approx([20, 50, 50], abs=1e-3)  # errors: STL / error, not the error

    pareto = chart_data(suite / "index.html", "pareto")
    assert "normalized" in pareto["yTitle"] and pareto["yUnit"] == "% of STL"
    assert {p["label"]: p["y"] for p in pareto["points"]} == pytest.approx(
        {"fast": normalized["fast"], "slow": normalized["slow"]}, abs=1e-3)
    assert [p["x"] for p in pareto["front"]] == [2.0, 10.0]  # slow is better, fast is faster: both on the front
    assert {r["label"]: r["y"] for r in pareto["references"]} == pytest.approx(
        {"pretrained": normalized["pretrained"], "STL": 100}, abs=1e-3)

    entry = suite / "submissions" / "fast.html"
    bars = chart_data(entry, "tasks")
    assert bars["yTitle"] == per_task["yTitle"] and bars["series"][0]["values"] == values["fast"]
    # Each metric of a task keeps its own corrupted value (the lookup is by task and metric).
    assert table_text(entry, "robustness")[1:] == [
        ["segmentation", "miou", "40.0", "30.0"], ["segmentation", "pixel_accuracy", "65.0", "61.0"],
        ["depth", "abs_err", "50.0", "60.0"], ["depth", "rel_err", "18.0", "21.0"], ["normal", "mean_angle", "30.0", ""]]
    assert "Average" not in entry.read_text().split('class="summary"')[1].split("</p>")[0]
    # The suite's robustness summary never averages mIoU with depth and angle errors.
    from harness.leaderboard import robustness
    _, robust = robustness(store, "nyu-like", ["gaussian_noise"])
    assert all(e.extra["conditions"] == {"gaussian_noise": None} for e in robust)
    index = (tmp_path / "out" / "index.html").read_text()
    assert f"{normalized['slow']:.1f}" in index and "normalized score (% of STL)" in index


def test_charts_of_an_accuracy_suite_plot_raw_accuracy(tmp_path):
    """Where every metric is a score, the charts keep plotting the scores themselves and their average."""
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    stored_suite(store, "acc", {"a": ["accuracy"], "b": ["accuracy"]}, {
        ("reference", "STL"): {("a", "accuracy"): 90.0, ("b", "accuracy"): 80.0},
        ("submission", "merged"): {("a", "accuracy"): 70.0, ("b", "accuracy"): 60.0, "fusion": 1.5}})
    build(store, tmp_path / "out")
    suite = tmp_path / "out" / "suites" / "acc"
    per_task = chart_data(suite / "index.html", "tasks")
    assert per_task["yTitle"] == "accuracy (%)"
    assert {s["label"]: s["values"] for s in per_task["series"]} == {"STL": [90.0, 80.0], "merged": [70.0, 60.0]}
    pareto = chart_data(suite / "index.html", "pareto")
    assert pareto["yTitle"] == "average accuracy (%)" and pareto["yUnit"] == "%"
    colors = {s["label"]: s["color"] for s in per_task["series"]}
    assert pareto["points"] == [{"x": 1.5, "y": 65.0, "label": "merged", "color": colors["merged"]}]
    assert pareto["references"] == [{"label": "STL", "y": 85.0, "color": colors["STL"]}]
    assert chart_data(suite / "submissions" / "merged.html", "tasks")["yTitle"] == "accuracy (%)"


# ----------------------------------------------------------------------------- a real site

@pytest.fixture(scope="module")
def built(fbh_env, tmp_path_factory):
    """A database filled by real runs (task arithmetic, an ensemble, a hostile grid search) and its site."""
    work = tmp_path_factory.mktemp("site")
    db = work / "site.duckdb"
    hostile = work / "hostile.yaml"
    hostile.write_text(
        "name: hostile-average\nmethod: task_arithmetic\ngrid: {scaling_factor: [0.3, 1.0]}\n"
        f"description: '{HOSTILE}'\nauthors: '<b>Mallory</b>'\nurl: 'https://example.org/?q=\"><script>'\n")
    for sub in (REPO / "submissions" / "task_arithmetic.yaml", REPO / "submissions" / "simple_ensemble.yaml", hostile):
        res = fbh("submit", sub, "--db", db, "--quiet")
        assert res.exit_code == 0, res.output
    out = work / "out"
    res = fbh("site", "build", "--db", db, "--out", out)
    assert res.exit_code == 0, res.output
    return db, out


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_site_files_match_the_leaderboard(built):
    db, out = built
    suite = out / "suites" / "tiny-small"
    tasks, entries = table(Store(db), "tiny-small")
    rows = read_csv(suite / "leaderboard.csv")
    assert [r["method"] for r in rows] == [e.label for e in entries]
    assert [r["method"] for r in rows][:4] == ["pretrained", "STL", "MTL", "Made-up paper row"]
    assert {r["method"] for r in rows[4:]} == {"task-arithmetic", "simple-ensemble", "hostile-average"}
    for r, e in zip(rows, entries):
        for t in SMALL_TASKS:
            assert float(r[t]) == pytest.approx(e.scores[t], abs=1e-3)
        assert float(r["average"]) == pytest.approx(e.average, abs=1e-3)
    ensemble = next(r for r in rows if r["method"] == "simple-ensemble")
    assert int(ensemble["params"]) == 3 * int(rows[0]["params"])
    assert float(ensemble["fusion s"]) > 0 and int(ensemble["peak MiB"]) > 0

    # Every metric is an accuracy: the charts plot raw accuracy and the average, as before multi-metric suites.
    per_task = chart_data(suite / "index.html", "tasks")
    assert per_task["yTitle"] == "accuracy (%)"
    by_label = {e.label: e for e in entries}
    for series in per_task["series"]:
        assert series["values"] == [by_label[series["label"]].scores[t] for t in tasks]
    pareto = chart_data(suite / "index.html", "pareto")
    assert pareto["yTitle"] == "average accuracy (%)"
    assert {p["label"]: p["y"] for p in pareto["points"]} == pytest.approx(
        {e.label: e.average for e in entries if e.kind == "submission"}, abs=1e-3)
    assert {r["label"] for r in pareto["references"]} == {"pretrained", "STL", "MTL", "Made-up paper row"}
    assert table_text(suite / "submissions" / "task-arithmetic.html", "robustness")[0] == [
        "task", "metric", "clean", "gaussian_noise", "jpeg"]

    robust = read_csv(suite / "robustness.csv")
    assert list(robust[0])[2:] == ["clean", "gaussian_noise", "jpeg", "corrupted mean"]
    assert all(r["gaussian_noise"] for r in robust if r["kind"] != "published")
    general = read_csv(suite / "generalization-two-seen.csv")
    assert list(general[0])[2:] == ["digits", "shapes", "seen avg", "textures", "unseen avg"]
    assert {r["method"] for r in general} >= {"STL", "task-arithmetic", "hostile-average"}

    page = (suite / "submissions" / "task-arithmetic.html").read_text()
    assert "scaling_factor" in page and "0.3" in page and "95% CI" in page and "Provenance" in page
    assert "torch" in page and "seed" in page

    hostile = (suite / "submissions" / "hostile-average.html").read_text()
    assert "<script>window.__pwned" not in hostile and "<img src=x" not in hostile and "<b>Mallory" not in hostile
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in hostile
    assert 'rel="noopener nofollow noreferrer"' in hostile
    for html in [*suite.rglob("*.html"), out / "index.html"]:
        assert "Content-Security-Policy" in html.read_text()


@pytest.mark.slow
def test_rebuild_removes_only_what_the_last_build_wrote(built, tmp_path):
    """A page the previous build's manifest lists and this build no longer writes is removed; a file the
    manifest does not list (a Pages CNAME, a user's notes) survives, in place; a folder with files and no
    manifest is refused."""
    import json
    db, out = built
    manifest = json.loads((out / ".fbh-site").read_text())
    stale = out / "suites" / "stale.html"
    stale.write_text("a page of a suite since removed")
    (out / ".fbh-site").write_text(json.dumps({**manifest, "files": [*manifest["files"], "suites/stale.html"]}))
    (out / "CNAME").write_text("leaderboard.example.org\n")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine")
    assert fbh("site", "build", "--db", db, "--out", out).exit_code == 0
    assert not stale.exists() and (out / "index.html").exists()
    assert (out / "CNAME").read_text() == "leaderboard.example.org\n"
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    assert "CNAME" not in json.loads((out / ".fbh-site").read_text())["files"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    res = fbh("site", "build", "--db", db, "--out", foreign)
    assert res.exit_code == 2 and "no manifest" in res.output and "Traceback" not in res.output
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert fbh("site", "build", "--db", tmp_path / "none.duckdb", "--out", tmp_path / "x").exit_code == 2


@pytest.mark.slow
def test_preview_server_is_local_only(built):
    _, out = built
    with preview_server(out, 0) as server:
        assert server.server_address[0] == "127.0.0.1"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/suites/tiny-small/leaderboard.csv"
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.read().decode().startswith("method,kind,rank,digits")
        finally:
            server.shutdown()
            thread.join()


# ----------------------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (pip install '.[test]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("FBH_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests need {missing}")
        pytest.skip(f"browser tests need {missing}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    yield pg
    context.close()


def column(pg, table_id: str, body: str, index: int) -> list[str]:
    return pg.eval_on_selector_all(f"#{table_id} tbody.{body} tr",
                                   f"rows => rows.map(r => r.cells[{index}].textContent.trim())")


@pytest.mark.slow
def test_suite_page_renders_sorts_and_plots(built, page):
    _, out = built
    page.goto((out / "suites" / "tiny-small" / "index.html").as_uri())
    assert column(page, "leaderboard", "references", 0) == ["pretrained", "STL", "MTL"]
    assert column(page, "leaderboard", "published", 0) == ["Made-up paper rowpublished: test fixture, Table 0"]
    subs = column(page, "leaderboard", "submissions", 0)
    assert sorted(subs) == ["hostile-average", "simple-ensemble", "task-arithmetic"]
    assert page.locator("#robustness tbody tr").count() == 7
    assert page.locator("table[id^=generalization] tbody.submissions tr").count() == 3
    charted = page.eval_on_selector_all("canvas[data-chart]", "cs => cs.map(c => !!Chart.getChart(c))")
    assert charted == [True] * 5  # Pareto, cost, per task, robustness, generalization

    digits = 3  # columns: method, kind, rank, then the tasks
    header = page.locator("#leaderboard thead th").nth(digits)
    assert header.text_content().strip() == "digits"
    values = lambda body: [float(v) for v in column(page, "leaderboard", body, digits)]
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    assert values("submissions") == sorted(values("submissions"), reverse=True)
    assert values("references") == sorted(values("references"), reverse=True)
    assert page.locator("#leaderboard tbody").first.get_attribute("class") == "references"
    header.locator("button").click()
    assert values("submissions") == sorted(values("submissions"))
    method = page.locator("#leaderboard thead th").nth(0)
    method.locator("button").click()
    assert column(page, "leaderboard", "submissions", 0) == sorted(subs)

    with page.expect_download() as download:
        page.locator("#leaderboard caption a.csv").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [r["method"] for r in rows][:3] == ["pretrained", "STL", "MTL"] and len(rows) == 7

    if os.environ.get("FBH_SITE_SCREENSHOT"):
        page.reload()
        page.screenshot(path=os.environ["FBH_SITE_SCREENSHOT"], full_page=True)
    assert page.errors == []


@pytest.mark.slow
def test_every_link_resolves_and_hostile_text_stays_text(built, page):
    _, out = built
    seen, queue = set(), [(out / "index.html").as_uri()]
    while queue:
        url = queue.pop()
        if url in seen:
            continue
        seen.add(url)
        page.goto(url)
        assert page.evaluate("window.__pwned") is None, url
        targets = page.eval_on_selector_all("a[href], link[href], script[src]",
                                            "els => els.map(e => e.href || e.src)")
        for target in targets:
            parsed = urlparse(target)
            if parsed.scheme in ("http", "https"):
                continue  # a submission's own URL: shown, never fetched
            assert parsed.scheme == "file", target
            path = Path(unquote(parsed.path))
            assert path.is_file() and out.resolve() in path.resolve().parents, f"{url} -> {target}"
            if path.suffix == ".html":
                queue.append(path.as_uri())
    assert seen == {p.as_uri() for p in out.rglob("*.html")}  # every page is reachable from the index
    assert page.errors == []

    page.goto((out / "suites" / "tiny-small" / "submissions" / "hostile-average.html").as_uri())
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".description").text_content() == HOSTILE
    assert page.locator("img").count() == 0
    link = page.locator(".about a")
    assert link.get_attribute("href") == 'https://example.org/?q="><script>'
    assert set(link.get_attribute("rel").split()) >= {"noopener", "nofollow"}
    # Second line of defence: even markup that got into the page could not run a handler.
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=\"missing.png\" onerror=\"window.__csp=1\">')")
    page.wait_for_timeout(500)
    assert page.evaluate("window.__csp") is None
    assert any("Content Security Policy" in e for e in page.errors)
    assert page.locator("#grid tbody tr").count() == 2 and page.locator("#grid tr.chosen").count() == 1
    chosen = page.locator("#params tbody td").nth(1).text_content()
    assert f"scaling_factor={chosen}" in page.locator("#grid tr.chosen").text_content()
    assert page.locator("#results tbody tr").count() == len(SMALL_TASKS)
    first = page.locator("#results tbody tr").first.locator("td")
    assert first.nth(1).text_content() == "accuracy" and first.nth(3).text_content().startswith("[")


def test_mixed_direction_charts_draw_with_their_titles(tmp_path, page):
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    stored_suite(store, "nyu-like", NYUV2_LIKE, nyuv2_like_runs())
    build(store, tmp_path / "out")
    page.goto((tmp_path / "out" / "suites" / "nyu-like" / "index.html").as_uri())
    drawn = page.eval_on_selector_all("canvas[data-chart]", """cs => cs.map(c => {
        const chart = Chart.getChart(c);
        return [chart.config.type, chart.options.scales.y ? chart.options.scales.y.title.text
                                                          : chart.options.plugins.title.text,
                chart.data.datasets[0].data.length];
    })""")
    assert drawn[0] == ["scatter", "normalized score (% of STL)", 1]  # a dataset per submission: its own colour
    assert drawn[2][0] == "bar" and "% of STL" in drawn[2][1] and drawn[2][2] == 3
    assert page.errors == []


# ----------------------------------------------------------------------------- the researcher's site (#20)

def paper_suite(store: Store, with_run: bool) -> None:
    """A suite whose file pins two paper rows (one naming task_arithmetic), and optionally a computed
    task-arithmetic submission 0.2 and 0.6 points off the paper row, within its 1.0 tolerance."""
    store.upsert_suite({"name": "paper", "title": "paper", "tasks": [{"name": "a"}, {"name": "b"}],
                        "references": {"published": [
                            {"label": "Task Arithmetic", "method": "task_arithmetic", "source": "FusionBench Table 3",
                             "tolerance": 1.0, "values": {"a": 70.0, "b": 60.0}},
                            {"label": "Ties-Merging", "source": "FusionBench Table 3", "values": {"a": 72.0, "b": 61.0}},
                            {"label": "Other split", "source": "Table 9", "split": "s", "values": {"a": 1.0}}]}}, "h")
    if with_run:
        for label, method, values in (("STL", None, (90.0, 80.0)), ("my-ta", "task_arithmetic", (70.2, 60.6))):
            store.write_run(Run(run_key=label, kind="reference" if method is None else "submission", label=label,
                                suite="paper", method=method, output_kind="merged", n_parameters=10,
                                finished_at=datetime(2026, 1, 1)),
                            [{"task": t, "metric": "accuracy", "condition": "clean", "task_split": "seen", "value": v,
                              "n": 10} for t, v in zip("ab", values)])


def test_paper_rows_show_without_runs_and_the_difference_once_computed(tmp_path, page):
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    paper_suite(store, with_run=False)
    build(store, tmp_path / "out")
    suite = tmp_path / "out" / "suites" / "paper" / "index.html"
    page.goto(suite.as_uri())
    # Both clean 'all' rows of the suite file, with their source as visible text, marked as not run here.
    assert column(page, "leaderboard", "published", 1) == ["published", "published"]
    sources = page.locator("#leaderboard tbody.published .source")
    assert sources.count() == 2 and all(sources.nth(i).is_visible() for i in range(2))
    assert "FusionBench Table 3 (from the suite file; not run here)" in sources.first.text_content()
    assert page.locator("#leaderboard tbody.submissions, #leaderboard tbody.references").count() == 0
    assert page.locator("#leaderboard thead th", has_text="vs paper").count() == 0
    assert page.errors == []
    page.goto((suite.parent / "compare.html").as_uri())
    assert page.locator("#compare-empty").is_visible()  # paper rows are never compared as if computed

    paper_suite(store, with_run=True)
    build(store, tmp_path / "out")
    page.goto(suite.as_uri())
    headers = page.eval_on_selector_all("#leaderboard thead th", "ths => ths.map(t => t.textContent.trim())")
    mine = page.locator("#leaderboard tbody.submissions tr").first.locator("td")
    assert mine.nth(headers.index("vs paper")).text_content() == "+0.4 within 1"  # mean of +0.2 and +0.6
    assert page.locator("#leaderboard tbody.references tr").first.locator("td").nth(headers.index("vs paper")) \
        .text_content() == ""
    entry = (tmp_path / "out" / "suites" / "paper" / "submissions" / "my-ta.html").read_text()
    assert "Difference from the paper: +0.40" in entry and "within 1.0" in entry
    assert page.errors == []


@pytest.mark.slow
def test_comparison_page_gives_the_paired_bootstrap_of_fbh_compare(built, page):
    from harness.leaderboard import compare
    db, out = built
    page.goto((out / "suites" / "tiny-small" / "compare.html").as_uri())
    for a, b in (("task-arithmetic", "simple-ensemble"), ("simple-ensemble", "task-arithmetic"), ("STL", "hostile-average")):
        page.select_option("#compare-a", a)
        page.select_option("#compare-b", b)
        _, _, expected = compare(Store(db), "tiny-small", a, b)
        shown = page.eval_on_selector_all("#compare-table tbody tr",
                                          "rows => rows.map(r => Array.from(r.cells, c => c.textContent))")
        assert [r[0] for r in shown] == [d.what for d in expected] and expected[-1].what == "average"
        for row, d in zip(shown, expected):
            assert float(row[3]) == pytest.approx(d.difference, abs=0.006)
            lo, hi = (float(v) for v in row[4].strip("[]").split(","))
            assert (lo, hi) == pytest.approx(d.ci, abs=0.006)
            assert float(row[5]) == pytest.approx(d.p_value, rel=0.05)
        assert page.locator("#compare-summary").text_content().startswith(f"{a} minus {b} on average")
    page.select_option("#compare-b", "STL")
    assert page.locator("#compare-table tbody tr").count() == 0  # an entry against itself
    assert page.errors == []


@pytest.mark.slow
def test_filters_and_the_best_merge(built, page):
    _, out = built
    page.goto((out / "suites" / "tiny-small" / "index.html").as_uri())
    visible = lambda: page.eval_on_selector_all(  # noqa: E731
        "#leaderboard tbody.submissions tr", "rows => rows.filter(r => !r.hidden).map(r => r.cells[0].textContent.trim())")
    assert sorted(visible()) == ["hostile-average", "simple-ensemble", "task-arithmetic"]
    page.select_option("select[data-filter=category]", "ensemble")
    assert visible() == ["simple-ensemble"]
    assert page.locator("#filter-count").text_content() == "1 of 3 submissions shown"
    assert page.locator("#leaderboard tbody.references tr:visible").count() == 3  # yardsticks stay
    page.select_option("select[data-filter=category]", "")
    page.select_option("select[data-filter=access]", "none")  # a grid search reads labelled validation data
    assert sorted(visible()) == ["simple-ensemble", "task-arithmetic"]
    page.check("#merges-only")
    assert visible() == ["task-arithmetic"]
    page.select_option("select[data-filter=output]", "ensemble")
    assert visible() == []
    best_merge = page.locator("#best-merge a").text_content()
    assert best_merge in ("hostile-average", "task-arithmetic")
    assert page.locator("#best-overall a").text_content() == column(page, "leaderboard", "submissions", 0)[0]

    cost, toggle = page.locator("#leaderboard thead th.cost"), page.locator("#toggle-costs")
    if toggle.get_attribute("aria-pressed") == "true":  # started hidden: the table did not fit the window
        toggle.click()
    assert cost.count() == 4 and cost.first.is_visible() and toggle.get_attribute("aria-pressed") == "false"
    toggle.click()
    assert not cost.first.is_visible() and not page.locator("#leaderboard td.cost").first.is_visible()
    assert not page.locator("#leaderboard th.detail").first.is_visible()
    assert page.locator("#leaderboard thead th", has_text="average").is_visible()
    assert page.errors == []


def chart_colors(pg) -> list[dict[str, str]]:
    """Per chart of the page: entry label -> the colour Chart.js drew its dataset in."""
    return pg.eval_on_selector_all("canvas[data-chart]", """cs => cs.map(c => Object.fromEntries(
        Chart.getChart(c).data.datasets.filter(d => d.label !== 'Pareto front').map(d => [d.label, d.borderColor])))""")


@pytest.mark.slow
def test_an_entry_has_one_colour_in_every_chart(built, page):
    _, out = built
    suite = out / "suites" / "tiny-small"
    seen: dict[str, set[str]] = {}
    for html in (suite / "index.html", suite / "submissions" / "task-arithmetic.html", suite / "tasks" / "digits.html"):
        page.goto(html.as_uri())
        charts = chart_colors(page)
        assert charts and all(charts)
        for chart in charts:
            for label, color in chart.items():
                seen.setdefault(label, set()).add(color)
    assert {"pretrained", "STL", "MTL", "Made-up paper row", "task-arithmetic", "simple-ensemble"} <= set(seen)
    assert all(len(colors) == 1 for colors in seen.values()), seen
    assert len({c for colors in seen.values() for c in colors}) == len(seen)  # and no two entries share one
    assert page.errors == []


def no_sideways_scroll(pg) -> bool:
    return pg.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


@pytest.mark.slow
def test_no_horizontal_page_scroll_at_1366_and_400_px(built, browser):
    _, out = built
    suite = out / "suites" / "tiny-small"
    for width, pages in ((1366, [suite / "index.html", suite / "compare.html"]),
                         (400, [out / "index.html", suite / "submissions" / "task-arithmetic.html",
                                suite / "submissions" / "hostile-average.html", suite / "references" / "stl.html",
                                out / "methods" / "task_arithmetic.html"])):
        context = browser.new_context(viewport={"width": width, "height": 800})
        pg = context.new_page()
        for html in pages:
            pg.goto(html.as_uri())
            assert no_sideways_scroll(pg), (width, html)
        if width == 1366:
            pg.goto((suite / "index.html").as_uri())
            # the whole leaderboard fits its box at 1366 px, the entry's name column stays in view
            assert pg.evaluate("(w => w.scrollWidth <= w.clientWidth)(document.querySelector('#leaderboard').parentElement)")
            assert pg.eval_on_selector("#leaderboard td.first", "td => getComputedStyle(td).position") == "sticky"
        else:
            pg.goto((out / "index.html").as_uri())
            # who wins is visible without scrolling sideways
            best = pg.locator("#suites tbody td").nth(1).locator("a").first.bounding_box()
            assert best["x"] + best["width"] <= 400
        context.close()


@pytest.mark.slow
def test_downloads_parse_back_to_the_stored_rows(built):
    import duckdb
    db, out = built
    stored = Store(db).query("SELECT results.run_id, task, task_split, condition, severity, metric, value, ci_low, "
                             "ci_high, n, runs.fingerprint FROM results JOIN runs USING (run_id) WHERE runs.status = 'ok' "
                             "AND runs.kind IN ('submission', 'reference', 'published')")
    assert len(stored) > 50
    key = lambda r: (r["run_id"], r["task"], r["task_split"], r["condition"], r["severity"], r["metric"])  # noqa: E731
    want = {key(r): r for r in stored}
    numbers = ("value", "ci_low", "ci_high")

    def check(rows: list[dict], parse) -> None:
        assert len(rows) == len(stored) and {key({k: parse(k, v) for k, v in r.items()}) for r in rows} == set(want)
        for r in rows:
            r = {k: parse(k, v) for k, v in r.items()}
            expected = want[key(r)]
            for k in numbers:
                assert (r[k] is None) == (expected[k] is None) and (r[k] is None or r[k] == pytest.approx(expected[k]))
            assert r["n"] == expected["n"] and r["fingerprint"] == expected["fingerprint"]

    def from_csv(k, v):
        if v == "":
            return None
        return float(v) if k in numbers else int(v) if k in ("severity", "n") else v

    downloads = out / "downloads"
    check(read_csv(downloads / "results.csv"), from_csv)
    check(json.loads((downloads / "results.json").read_text()), lambda k, v: v)
    parquet = duckdb.connect().execute(f"SELECT * FROM read_parquet('{downloads / 'results.parquet'}')")
    names = [d[0] for d in parquet.description]
    check([dict(zip(names, row)) for row in parquet.fetchall()], lambda k, v: v)
    assert "replicates" not in names
    copy = Store(downloads / "results.duckdb")
    assert copy.counts() == Store(db).counts()
    assert copy.query("SELECT count(*) AS n FROM results WHERE replicates IS NOT NULL")[0]["n"] > 0
    index = (out / "index.html").read_text()
    assert all(f'href="downloads/{name}" download' in index for name in
               ("results.csv", "results.json", "results.parquet", "results.duckdb"))


@pytest.mark.slow
def test_method_task_reference_and_help_pages(built, page):
    _, out = built
    page.goto((out / "methods" / "task_arithmetic.html").as_uri())
    assert "@inproceedings{ilharco2023editing" in page.locator("#bibtex").text_content()
    assert page.locator("#citation a").get_attribute("href") == "https://arxiv.org/abs/2212.04089"
    assert table_text(out / "methods" / "task_arithmetic.html", "method-params")[1] == [
        "scaling_factor", "number", ">= 0.0; <= 10.0", "0.3", ""]
    uses = page.eval_on_selector_all("#method-uses tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert sorted(uses) == ["hostile-average", "task-arithmetic"]
    suite = out / "suites" / "tiny-small"
    digits = table_text(suite / "tasks" / "digits.html", "task-results")
    assert {r[0] for r in digits[1:]} >= {"STL", "task-arithmetic", "simple-ensemble"} and len(digits) == 8
    stl = (suite / "references" / "stl.html").read_text()
    assert "one fine-tuned expert per task (3 models)" in stl and "3 experts of" in stl
    assert table_text(suite / "index.html", "leaderboard")[2][-5] == "3 experts"  # STL's output column
    about = (out / "about.html").read_text()
    assert all(term in about for term in ("STL (single-task learning)", "MTL (multi-task learning)",
                                          "normalized score", "unlabeled_test"))
    submit = (out / "submit.html").read_text()
    assert "method: task_arithmetic" in submit and "fbh submit my-merge.yaml --suite tiny-small" in submit
    if os.environ.get("FBH_SITE_SCREENSHOTS"):
        shots = Path(os.environ["FBH_SITE_SCREENSHOTS"])
        for name, html in (("suite", suite / "index.html"), ("entry", suite / "submissions" / "task-arithmetic.html"),
                           ("method", out / "methods" / "task_arithmetic.html"), ("compare", suite / "compare.html")):
            page.goto(html.as_uri())
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert page.errors == []


def test_bibtex_only_from_a_citation_that_says_enough():
    from harness.site_pages import bibtex, paper_link, parameter_rows
    entry = bibtex('Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023. '
                   'arXiv:2306.01708')
    assert entry.startswith("@inproceedings{yadav2023ties") and "booktitle = {NeurIPS}" in entry
    assert "eprint = {2306.01708}" in entry and "author = {Yadav and others}" in entry
    assert bibtex("Averaging the weights of the models.") is None
    assert paper_link("see doi:10.1000/xyz123.") == "https://doi.org/10.1000/xyz123"
    assert paper_link("no link here") is None
    rows = parameter_rows({"properties": {"k": {"type": "integer", "exclusiveMinimum": 0},
                                          "mode": {"enum": ["a", "b"], "default": "a"},
                                          "w": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                          {"type": "null"}], "default": None}}})
    assert [(r["name"], r["type"], r["bounds"], r["default"]) for r in rows] == [
        ("k", "integer", "> 0", "(required)"), ("mode", "any", "one of a, b", '"a"'),
        ("w", "array of number or null", "", "null")]


EIGHT_TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def test_an_eight_task_leaderboard_fits_1366_px(tmp_path, browser):
    """FusionBench's eight-task table fits a 1366 px window: the cost and detail columns start hidden when
    they would not fit, and shown again they scroll inside the table's own box, never the page."""
    from harness.site import build
    store = Store(tmp_path / "db.duckdb")
    runs = {("reference", "pretrained"): {}, ("reference", "STL"): {}, ("submission", "a-long-submission-name"): {},
            ("submission", "ties"): {}}
    for i, values in enumerate(runs.values()):
        values.update({(t, "accuracy"): 40.0 + 7 * i + j for j, t in enumerate(EIGHT_TASKS)}, fusion=1.0 + i)
    stored_suite(store, "eight", {t: ["accuracy"] for t in EIGHT_TASKS}, runs)
    build(store, tmp_path / "out")
    context = browser.new_context(viewport={"width": 1366, "height": 800})
    pg = context.new_page()
    pg.goto((tmp_path / "out" / "suites" / "eight" / "index.html").as_uri())
    fits = "(w => w.scrollWidth <= w.clientWidth)(document.querySelector('#leaderboard').parentElement)"
    assert pg.evaluate(fits) and no_sideways_scroll(pg)
    assert all(pg.locator("#leaderboard thead th", has_text=t).is_visible() for t in EIGHT_TASKS + ["average", "95% CI"])
    if pg.locator("#toggle-costs").get_attribute("aria-pressed") == "true":
        pg.click("#toggle-costs")
    assert pg.locator("#leaderboard thead th.cost").first.is_visible() and no_sideways_scroll(pg)
    context.close()
