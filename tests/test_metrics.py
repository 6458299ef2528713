"""One metric registry (harness.metrics): what suites may name, each metric's direction, aggregation and
display, read by evaluation, selection, the leaderboard and the site alike."""

from __future__ import annotations

import typing

import pytest
import torch

from harness.metrics import METRICS, higher_is_better, label
from harness.spec import TaskSpec


def test_suites_accept_exactly_the_registered_metrics():
    assert set(typing.get_args(TaskSpec.model_fields["metric"].annotation)) == set(METRICS)
    with pytest.raises(Exception):
        TaskSpec.model_validate({"name": "t", "dataset": "d", "metric": "f1"})


def test_directions_and_labels():
    assert higher_is_better("accuracy") and not higher_is_better("abs_err") and higher_is_better(None)
    assert label("mean_angle").endswith("lower is better") and label("unknown_old_metric") == "unknown_old_metric"


def test_evaluation_refuses_a_family_that_aggregates_a_metric_otherwise():
    from harness import evaluate

    class MeanOnlyFamily:  # computes Spearman as a mean of per-example scores: a registry mismatch
        suite = type("S", (), {"task": staticmethod(lambda t: TaskSpec(name=t, dataset="d", metric="spearman"))})()

        def eval_data(self, task, split, condition=None, severity=None):
            return torch.zeros(4, 2), torch.zeros(4)

        def logits(self, model, task, x):
            return x

        def score(self, task, outputs, targets):
            return torch.ones(len(targets))

    predictor = evaluate.Predictor([torch.nn.Identity()])
    with pytest.raises(TypeError, match="registers it as aggregation 'corpus'"):
        evaluate.score_task(predictor, MeanOnlyFamily(), "t", split="test", task_split="seen")
