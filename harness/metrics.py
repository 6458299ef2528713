"""Every metric a suite may name, registered once: its direction, how it aggregates over test examples,
and how it is shown. Evaluation, grid selection, the leaderboard and the site read it from here.

aggregation 'mean': the metric is the mean of per-example scores (a family's `score`), so its bootstrap
resamples examples' scores; 'corpus': a statistic of the whole sample (Spearman's rho, mean IoU), which a
family computes from any subset of examples (its `statistic` / `metric_statistic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool
    aggregation: Literal["mean", "corpus"]
    label: str          # what a column of it means, with its unit
    decimals: int = 1   # how many a table shows


DEFAULT_METRIC = "accuracy"  # a task that names none
METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("accuracy", True, "mean", "accuracy (%)"),
    MetricInfo("exact_match", True, "mean", "exact match (%)"),
    MetricInfo("spearman", True, "corpus", "Spearman rho x 100"),
    MetricInfo("miou", True, "corpus", "mean IoU (%)"),
    MetricInfo("pixel_accuracy", True, "corpus", "pixel accuracy (%)"),
    MetricInfo("abs_err", False, "corpus", "absolute error x 100, lower is better"),
    MetricInfo("rel_err", False, "corpus", "relative error x 100, lower is better"),
    MetricInfo("mean_angle", False, "corpus", "mean angular error (degrees), lower is better"),
]}
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]  # what a suite's metric fields accept


def metric(name: str | None) -> MetricInfo:
    """The registered metric (the default for None); an unknown name is a programming error, since suite
    specs only accept registered names."""
    return METRICS[name or DEFAULT_METRIC]


def higher_is_better(name: str | None) -> bool:
    return metric(name).higher_is_better


def label(name: str | None) -> str:
    """A metric's column title; an unregistered name (an old database's) is shown as itself."""
    known = METRICS.get(name or DEFAULT_METRIC)
    return known.label if known else str(name)
