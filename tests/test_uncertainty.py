"""How sure the leaderboard is: averages' intervals, rank ranges and paired comparisons from the
bootstrap replicates every result row stores (harness.uncertainty)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.evaluate import bootstrap_replicates, task_seed
from harness.store import Store
from harness.uncertainty import paired_difference, paired_differences, rank_ranges
from conftest import REPO, SMALL_TASKS, shipped_submissions_db


def fbh(*args):
    return CliRunner().invoke(main, list(args))


def test_replicates_of_two_entries_are_paired_on_the_same_examples():
    g = torch.Generator().manual_seed(1)
    a, b = ((torch.rand(300, generator=g) < p).double() for p in (0.7, 0.6))
    seed = task_seed("digits")
    # The difference of the two entries' replicates is the bootstrap of the per-example difference.
    assert torch.allclose(bootstrap_replicates(a, seed) - bootstrap_replicates(b, seed),
                          bootstrap_replicates(a - b, seed))
    # Tasks are resampled independently of each other.
    other = bootstrap_replicates(a, task_seed("shapes"))
    assert abs(np.corrcoef(bootstrap_replicates(a, seed).numpy(), other.numpy())[0, 1]) < 0.15


def test_paired_difference_and_rank_ranges_by_hand():
    same = np.linspace(40, 60, 1000)
    d = paired_difference("t", 50.0, 50.0, same, same)
    assert d.difference == 0 and d.ci == (0.0, 0.0) and d.p_value == 1.0
    far = paired_difference("t", 80.0, 50.0, same + 30, same)
    assert far.ci == pytest.approx((30.0, 30.0)) and far.p_value == pytest.approx(1 / 1000)  # the floor
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (4, 1000))
    # Two entries far apart and two within noise of each other.
    ranges = rank_ranges([90, 70, 50.2, 50.0], [90 + noise[0], 70 + noise[1], 50.2 + noise[2], 50 + noise[3]])
    assert ranges[:2] == [(1, 1), (2, 2)] and ranges[2] == (3, 4) and ranges[3] == (3, 4)
    assert rank_ranges([1.0, 2.0], [None, None], higher_better=False) == [(1, 1), (2, 2)]


@pytest.fixture(scope="module")
def board_db(fbh_env):
    return shipped_submissions_db(fbh_env / "uncertainty.duckdb", ["task_arithmetic", "simple_average"])


@pytest.mark.slow
def test_leaderboard_carries_intervals_and_rank_ranges(board_db):
    data = json.loads(fbh("leaderboard", "--db", str(board_db), "--json").output)  # the only suite: no --suite
    assert data["suite"] == "tiny-small" and data["metrics"] == {t: "accuracy" for t in SMALL_TASKS}
    by = {e["label"]: e for e in data["entries"]}
    for label in ("pretrained", "STL", "task-arithmetic", "simple-average"):
        lo, hi = by[label]["average_ci"]
        assert lo <= by[label]["average"] <= hi
    # Averaging independently resampled tasks narrows the interval below the tasks' typical width.
    rows = Store(board_db).query("SELECT ci_low, ci_high FROM results WHERE run_id = ? AND condition = 'clean'",
                                 [by["STL"]["run_id"]])
    lo, hi = by["STL"]["average_ci"]
    assert hi - lo < np.mean([r["ci_high"] - r["ci_low"] for r in rows])
    ranks = {by[s]["rank"] for s in ("task-arithmetic", "simple-average")}
    assert ranks <= {"1", "2", "1-2"} and by["pretrained"]["rank"] is None  # references are not ranked
    table = fbh("leaderboard", "--db", str(board_db), "--setting", "two-seen").output
    assert table.splitlines()[0].split()[:3] == ["rank", "kind", "label"] and "seen avg" in table.splitlines()[0]


@pytest.mark.slow
def test_compare_is_a_paired_bootstrap(board_db):
    out = json.loads(fbh("compare", "task-arithmetic", "pretrained", "--db", str(board_db), "--json").output)
    rows = {r["what"]: r for r in out["rows"]}
    assert list(rows) == [*SMALL_TASKS, "average"]
    for r in rows.values():
        assert r["ci"][0] <= r["difference"] <= r["ci"][1] and 0 < r["p_value"] <= 1
    itself = json.loads(fbh("compare", "STL", "STL", "--db", str(board_db), "--json").output)
    assert all(r["difference"] == 0 and r["p_value"] == 1 for r in itself["rows"])
    text = fbh("compare", "task-arithmetic", "simple-average", "--db", str(board_db)).output
    assert "average" in text and "95% CI" in text


@pytest.mark.slow
@pytest.mark.parametrize("args, field, fix", [
    (["leaderboard", "--setting", "foo"], "--setting", "all, two-seen"),
    (["leaderboard", "--condition", "fog"], "--condition", "clean, gaussian_noise, jpeg"),
    (["leaderboard", "--condition", "jpeg@9"], "--condition", "clean, gaussian_noise, jpeg"),
    (["leaderboard", "--suite", "nope"], "--suite", "tiny-small"),
    (["compare", "task-arithmetic", "nope"], "B", "task-arithmetic"),
])
def test_unknown_views_are_errors_naming_the_valid_ones(board_db, args, field, fix):
    res = fbh(*args, "--db", str(board_db))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert field in res.output and fix in res.output


def test_methods_show_and_list_answer_from_the_index_without_torch(tmp_path):
    env = {"FBH_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-m", "harness.cli", "methods", "list", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    cards = {c["name"]: c for c in json.loads(first.stdout)["methods"]}
    assert cards["ties_merging"]["params"]["properties"]["top_k"]["default"] == 0.2
    probe = ("import sys; from harness.registry import method_cards; cards, _ = method_cards(); "
             "print(len(cards), 'torch' in sys.modules)")
    again = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.stdout.split() == [str(len(cards)), "False"]
    shown = fbh("methods", "show", "ties_merging")
    assert shown.exit_code == 0 and "arXiv:2306.01708" in shown.output and "top_k: number (> 0.0, <= 1.0)" in shown.output
    unknown = fbh("methods", "show", "tie_merging")
    assert unknown.exit_code == 2 and "ties_merging" in unknown.output


@pytest.mark.slow
def test_seeds_are_one_entry_with_their_mean_and_spread(fbh_env, tmp_path, write_yaml):
    db = str(tmp_path / "seeds.duckdb")
    sub = write_yaml("dare.yaml", {"name": "dare-seeds", "method": "dare", "seeds": [0, 1, 2]})
    assert fbh("submit", str(sub), "--db", db, "--quiet").exit_code == 0
    store = Store(db)
    runs = store.query("SELECT seed FROM runs WHERE label = 'dare-seeds' AND setting = 'all' AND NOT superseded")
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    data = json.loads(fbh("leaderboard", "--db", db, "--json").stdout)
    (entry,) = [e for e in data["entries"] if e["label"] == "dare-seeds"]
    assert entry["extra"]["seeds"] == [0, 1, 2] and entry["extra"]["average_std"] is not None
    per_seed = [json.loads(r["v"]) for r in store.query(
        "SELECT to_json(list(value ORDER BY task)) AS v FROM results JOIN runs USING (run_id) WHERE label = "
        "'dare-seeds' AND setting = 'all' AND condition = 'clean' GROUP BY seed")]
    assert entry["average"] == pytest.approx(np.mean([np.mean(v) for v in per_seed]), abs=1e-4)
    # Listing one seed afterwards takes the other two off the leaderboard (kept, superseded).
    one = write_yaml("dare.yaml", {"name": "dare-seeds", "method": "dare", "seed": 1})
    assert fbh("submit", str(one), "--db", db, "--quiet").exit_code == 0
    data = json.loads(fbh("leaderboard", "--db", db, "--json").stdout)
    (entry,) = [e for e in data["entries"] if e["label"] == "dare-seeds"]
    assert "seeds" not in entry["extra"]
    assert fbh("validate", str(write_yaml("both.yaml", {"name": "b", "method": "dare", "seed": 3,
                                                        "seeds": [1, 2]}))).exit_code == 2


def test_many_pairs_at_once_give_what_one_pair_at_a_time_gives():
    """The site compares every pair of a suite's entries in one call; each row must be paired_difference's."""
    rng = np.random.default_rng(0)
    a_reps, b_reps = rng.normal(50, 2, (6, 400)), rng.normal(50.5, 2, (6, 400))
    b_reps[2] = a_reps[2]                      # no difference at all: p = 1
    a_reps[4, :3] = np.nan                     # a resample undefined for one entry: left out, as one by one
    a, b = np.nanmean(a_reps, axis=1), b_reps.mean(axis=1)
    together = paired_differences("t", a, b, a_reps, b_reps)
    for k, d in enumerate(together):
        one = paired_difference("t", float(a[k]), float(b[k]), a_reps[k], b_reps[k])
        assert (d.what, d.resamples, d.difference) == (one.what, one.resamples, pytest.approx(one.difference))
        assert d.ci == pytest.approx(one.ci, abs=1e-12) and d.p_value == pytest.approx(one.p_value, abs=1e-12)
    assert together[2].p_value == 1.0 and together[4].resamples == 397
