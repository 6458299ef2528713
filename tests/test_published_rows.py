"""The paper's published rows, checked for arithmetic and provenance.

Every suite's `references.published` rows are copied from FusionBench's tables by the catalog
(harness/families/catalog.py, PAPER_TABLES, read from suites/_paper/*.csv). A typo in a copied number, a shifted column or a
row filed under the wrong table would make the leaderboard compare against a number the paper
never printed. Where the paper states an average, the copied per-task values must give it back
to the paper's rounding; every row must name its table and be that table's row.
"""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from harness.families.catalog import PAPER_TABLES
from harness.spec import load_suite

SUITE_FILES = sorted((REPO / "suites").glob("*.yaml"))
# The paper prints one decimal: each copied value is within 0.05 of the true one, so their mean is
# within 0.05 of the true mean, which the stated average rounds to within another 0.05.
AVERAGE_SLACK = 0.05 + 0.05 + 1e-9


def published_rows():
    for path in SUITE_FILES:
        suite = load_suite(path)
        for row in suite.references.published:
            yield pytest.param(suite, row, id=f"{suite.name}:{row.source}:{row.label}")


def test_every_shipped_suite_is_covered():
    assert len(SUITE_FILES) >= 19 and any(True for _ in published_rows())


@pytest.mark.parametrize("source", sorted(PAPER_TABLES))
def test_stated_averages_equal_the_mean_of_the_copied_values(source):
    columns, lines = PAPER_TABLES[source]
    for label, values in lines:
        assert len(values) == len(columns), f"{source} '{label}': {len(values)} values for {len(columns)} columns"
        if "avg" not in columns:
            continue  # the paper's Avg. column was not copied for this table: nothing stated to check
        at = columns.index("avg")
        averaged = values[:at]  # Tables 5 and 16 average the seen tasks, the columns before 'avg'
        mean = sum(averaged) / len(averaged)
        assert abs(values[at] - mean) <= AVERAGE_SLACK, (
            f"{source} '{label}': stated average {values[at]} but the copied values average {mean:.3f}")


def test_some_tables_state_averages():
    """Guards the test above against checking nothing: Tables 5 and 16 carry the paper's averages."""
    assert {s for s, (columns, _) in PAPER_TABLES.items() if "avg" in columns} == {"FusionBench Table 5",
                                                                                  "FusionBench Table 16"}


@pytest.mark.parametrize("suite,row", list(published_rows()))
def test_published_row_is_its_source_tables_row(suite, row):
    assert re.fullmatch(r"FusionBench Table \d+( \(.+\))?", row.source), row.source
    assert row.source in PAPER_TABLES, f"no copied table for '{row.source}'"
    tasks = set(suite.task_names)
    assert set(row.values) <= tasks and "avg" not in row.values  # an average is never ranked as a task
    assert set(row.extra_values) <= set(row.values)
    columns, table = PAPER_TABLES[row.source]
    lines = dict(table)
    assert row.label in lines, f"'{row.label}' is not a row of {row.source}"
    stated = [v for c, v in zip(columns, lines[row.label]) if c != "avg"]
    copied = list(row.values.values()) + [v for extra in row.extra_values.values() for v in extra.values()]
    assert sorted(copied) == sorted(stated), f"{row.source} '{row.label}': suite values differ from the table"
    for task, value in row.values.items():
        if task in columns:  # columns named by task: each value sits under its own task
            assert value == lines[row.label][columns.index(task)], (row.source, row.label, task)
