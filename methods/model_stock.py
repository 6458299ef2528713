"""Model Stock: interpolate the experts' average toward the pre-trained model, per layer.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
arXiv:2403.19522

For every entry, theta = t * mean_t(theta_t) + (1 - t) * theta_pre with
t = k cos(a) / ((k - 1) cos(a) + 1), where k is the number of experts and a the angle
between task vectors (for k > 2 the mean of all pairwise angles, as FusionBench does).
There are no hyperparameters; at least two experts are needed.
"""

import itertools
import math

import torch

from harness.api import FusionContext, method
from harness.registry import NoParams, Properties
from harness.tensors import map_entries, stack

EPS = 1e-8


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float((a * b).sum()) / (math.sqrt(float((a * a).sum()) * float((b * b).sum())) + EPS)
    return math.acos(max(-1.0, min(1.0, cos)))


def interpolation_ratio(task_vectors: list, key: str) -> float:
    k = len(task_vectors)
    pairs = list(itertools.combinations(range(k), 2))
    mean_angle = sum(angle(task_vectors[i][key], task_vectors[j][key]) for i, j in pairs) / len(pairs)
    cos = math.cos(mean_angle)
    return k * cos / ((k - 1) * cos + 1 + EPS)


@method("model_stock", params=NoParams, category="merging",
        properties=Properties(why="its ratio is undefined for a single expert; it has no scaling factor"))
def model_stock(ctx: FusionContext, p: NoParams):
    if len(ctx.tasks) < 2:
        raise ValueError("model_stock needs at least two experts (the ratio comes from the angle between them)")
    experts, tvs = ctx.experts, ctx.task_vectors()

    def merge(key, base_tensor):
        t = interpolation_ratio(tvs, key)
        return t * stack(experts, key).mean(0) + (1 - t) * base_tensor.float()

    return map_entries(ctx.base, merge)
