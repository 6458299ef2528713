"""RegMean: merge each linear layer by the closed-form least-squares fit to every expert's inputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023. arXiv:2212.09849
For every nn.Linear, with G_t = X_t^T X_t / rows (the Gram matrix of the layer's inputs
in expert t on examples of its own task), W = (sum_t G~_t)^-1 sum_t G~_t W_t^T, where G~
keeps the diagonal of G and multiplies the off-diagonal entries by alpha
(reduce_non_diagonal_ratio). Every other floating entry (biases, norms, embeddings,
convolutions) is the plain average, as in the paper and FusionBench.
Defaults are FusionBench's CLIP settings (256 examples per task, alpha=0.95); the paper
selects alpha on validation data. Labels are not read: data access is unlabeled training inputs.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from pydantic import Field
from torch import Tensor, nn

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import StateDict, map_entries, stack


class RegMeanParams(Params):
    num_regmean_examples: int = Field(256, ge=1, le=1_000_000, description="training examples per task")
    batch_size: int = Field(32, ge=1, le=4096)
    reduce_non_diagonal_ratio: float = Field(0.95, ge=0.0, le=1.0, description="alpha: off-diagonal scale")


class GramAccumulator:
    """Running mean of x^T x over every input row of one linear layer."""

    def __init__(self):
        self.gram: Tensor | None = None
        self.rows = 0

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().float()
        x = x.reshape(-1, x.shape[-1])
        xtx = x.T @ x
        self.gram = xtx if self.gram is None else self.gram + xtx
        self.rows += x.shape[0]

    def mean(self) -> Tensor:
        return self.gram / self.rows


@torch.no_grad()
def input_grams(ctx: FusionContext, task: str, p: RegMeanParams) -> dict[str, Tensor]:
    """Gram matrix of the inputs of every nn.Linear of task's expert, keyed by the weight's name."""
    model = ctx.module(ctx.expert(task))
    accumulators = {name: GramAccumulator() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with ExitStack() as hooks:
        for name, m in model.named_modules():
            if name in accumulators:
                hooks.callback(m.register_forward_hook(accumulators[name]).remove)
        for inputs, _ in ctx.batches(task, "train", batch_size=p.batch_size, limit=p.num_regmean_examples):
            ctx.logits(model, task, inputs)
    return {f"{name}.weight": acc.mean().cpu() for name, acc in accumulators.items() if acc.rows}


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    scale = torch.full_like(gram, alpha)
    scale.fill_diagonal_(1.0)
    return gram * scale


def merge_with_grams(experts: list[StateDict], grams: list[dict[str, Tensor]], base: StateDict,
                     alpha: float) -> StateDict:
    def merge(key, _):
        weights = stack(experts, key)
        if key not in grams[0]:
            return weights.mean(0)
        reduced = [reduce_off_diagonal(g[key].to(weights.device), alpha) for g in grams]
        rhs = sum(g @ w.T for g, w in zip(reduced, weights))
        return torch.linalg.solve(sum(reduced), rhs).T

    return map_entries(base, merge)


@method("regmean", params=RegMeanParams, category="merging", data="unlabeled_train",
        samples="num_regmean_examples",
        properties=Properties(one_expert={"num_regmean_examples": 16}, quick={"num_regmean_examples": 16},
                              why="a least-squares merge of the experts has no scaling factor"))
def regmean(ctx: FusionContext, params: RegMeanParams):
    grams = [input_grams(ctx, t, params) for t in ctx.tasks]
    return merge_with_grams(ctx.experts, grams, ctx.base, params.reduce_non_diagonal_ratio)
