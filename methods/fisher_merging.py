"""Fisher merging: a per-parameter average of the experts weighted by their diagonal Fisher.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022. arXiv:2111.09832
theta_j = sum_t c_t F_t,j theta_t,j / sum_t c_t F_t,j, with F_t the diagonal Fisher of
expert t on examples of its own task (training split; FusionBench uses 256 per task).

Choices, named so results are comparable:
- fisher_estimator='exact' (the paper): per example, the expectation over the model's
  own predicted label distribution of the squared gradient of log p(y|x), summed exactly
  over the classes, averaged over examples. 'batch' (FusionBench/MergeLM): the square of
  one gradient per batch of sum_{x,y} sqrt(p(y|x)) log p(y|x), summed over batches and
  divided by the number of examples; cheaper, and it keeps cross-example terms.
- normalize_fisher_weight scales each expert's coefficient c_t by the inverse of the L2
  norm of its whole Fisher (FusionBench's default), so no expert dominates by scale.
Neither estimator reads the labels: data access is unlabeled training inputs.
Parameters that are not module parameters (floating buffers) are averaged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import StateDict, map_entries, stack


class FisherMergingParams(Params):
    num_fisher_examples: int = Field(256, ge=1, le=1_000_000, description="training examples per task")
    batch_size: int = Field(32, ge=1, le=4096)
    fisher_estimator: Literal["exact", "batch"] = "exact"
    normalize_fisher_weight: bool = True
    minimal_fisher_weight: float = Field(1e-6, ge=0.0, le=1.0, description="added to every Fisher entry")


def exact_fisher(model: nn.Module, logits_fn, batches) -> tuple[dict[str, Tensor], int]:
    """Sum over examples of E_{y~p(y|x)} (d log p(y|x) / d theta)^2, and the example count."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    n = 0
    for inputs, _ in batches:
        for x in inputs.split(1):
            logp = torch.log_softmax(logits_fn(model, x).float(), dim=-1)[0]
            probs = logp.detach().exp()
            for y in range(len(logp)):
                grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=y < len(logp) - 1,
                                            allow_unused=True)
                for k, g in zip(params, grads):
                    if g is not None:
                        total[k] += probs[y] * g.float() ** 2
            n += 1
    return total, n


def batch_fisher(model: nn.Module, logits_fn, batches) -> tuple[dict[str, Tensor], int]:
    """FusionBench's estimator: per batch, the squared gradient of sum sqrt(p) log p."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    n = 0
    for inputs, _ in batches:
        logp = torch.log_softmax(logits_fn(model, inputs).float(), dim=-1)
        objective = (logp.detach().exp().sqrt() * logp).sum()
        grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                total[k] += g.float() ** 2
        n += len(inputs)
    return total, n


ESTIMATORS = {"exact": exact_fisher, "batch": batch_fisher}


def fisher_of(ctx: FusionContext, task: str, p: FisherMergingParams) -> dict[str, Tensor]:
    model = ctx.module(ctx.expert(task))
    model.requires_grad_(True)
    batches = ctx.batches(task, "train", batch_size=p.batch_size, limit=p.num_fisher_examples)
    total, n = ESTIMATORS[p.fisher_estimator](model, lambda m, x: ctx.logits(m, task, x), batches)
    if n == 0:
        raise ValueError(f"task '{task}' has no training examples to estimate the Fisher from")
    return {k: v.cpu() / n for k, v in total.items()}


def merge_with_fisher(experts: list[StateDict], fishers: list[dict[str, Tensor]], base: StateDict,
                      normalize: bool, eps: float) -> StateDict:
    coeff = torch.full((len(experts),), 1.0 / len(experts))
    if normalize:
        norms = torch.stack([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f[k]) for k in f]))
                             for f in fishers])
        inv = 1.0 / (norms + eps)
        coeff = coeff * inv / inv.sum()

    def merge(key, _):
        theta = stack(experts, key)
        if key not in fishers[0]:
            return theta.mean(0)
        c = coeff.view(-1, *[1] * (theta.dim() - 1)).to(theta.device)
        weight = c * (stack(fishers, key).to(theta.device) + eps)
        return (weight * theta).sum(0) / weight.sum(0)

    return map_entries(base, merge)


@method("fisher_merging", params=FisherMergingParams, category="merging", data="unlabeled_train",
        samples="num_fisher_examples",
        properties=Properties(one_expert={"num_fisher_examples": 8}, quick={"num_fisher_examples": 8},
                              why="a weighted average has no scaling factor"))
def fisher_merging(ctx: FusionContext, params: FisherMergingParams):
    fishers = [fisher_of(ctx, t, params) for t in ctx.tasks]
    return merge_with_fisher(ctx.experts, fishers, ctx.base, params.normalize_fisher_weight,
                             params.minimal_fisher_weight)
