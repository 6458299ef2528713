"""Shared core of task-wise and layer-wise AdaMerging (not a method itself).

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. arXiv:2310.02575
theta = theta_0 + sum_t lambda_t(,l) tau_t(,l); the coefficients lambda are trained by
Adam to minimise the Shannon entropy of the merged model's predictions on unlabeled test
inputs of every task (test-time adaptation). Paper and FusionBench settings: lambda
initialised to 0.3, Adam with lr 1e-3 and betas (0.9, 0.999), batch size 16 per task,
one batch of every task per step, 500 steps in the paper (FusionBench runs 1000).
clamp_weights keeps lambda in [0, 1] as the paper's code does (FusionBench's CLIP config
turns it off).
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from harness.api import FusionContext, Params
from harness.tensors import StateDict, mergeable


class AdaMergingParams(Params):
    init_values: float = Field(0.3, ge=-10.0, le=10.0, description="initial value of every coefficient")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    max_steps: int = Field(500, ge=0, le=100_000, description="Adam steps; each reads one batch per task")
    batch_size: int = Field(16, ge=1, le=4096, description="unlabeled test inputs per task and step")
    clamp_weights: bool = Field(True, description="clip the coefficients to [0, 1] (the paper's code)")


def entropy(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean Shannon entropy of the softmax predictions (FusionBench's entropy_loss)."""
    probs = logits.float().softmax(dim=-1)
    return -(probs * (probs + eps).log()).sum(dim=-1).mean()


class _TaskLogits(nn.Module):
    """Runs the context's head on the model so functional_call can substitute its weights."""

    def __init__(self, model: nn.Module, logits_fn: Callable[[nn.Module, str, Tensor], Tensor]):
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, task: str, inputs: Tensor) -> Tensor:
        return self.logits_fn(self.model, task, inputs)


def endless_inputs(ctx: FusionContext, task: str, batch_size: int) -> Iterator[Tensor]:
    """Shuffled batches of task's test inputs, epoch after epoch.

    Each task's order depends only on the seed and the task's name, so the result does not
    depend on the order the experts come in.
    """
    generator = torch.Generator().manual_seed((ctx.seed * 1_000_003 + zlib.crc32(task.encode())) % 2**63)
    while True:
        for inputs, _ in ctx.batches(task, "test", batch_size=batch_size, generator=generator):
            yield inputs


def merge(base: StateDict, keys: list[str], task_vectors: list[StateDict], coeff: Tensor) -> dict[str, Tensor]:
    """theta_0 + sum_t coeff[t, i] tau_t for entry i; coeff has one column per key (or one in all)."""
    columns = coeff if coeff.dim() == 2 else coeff[:, None].expand(-1, len(keys))
    out = {}
    for i, k in enumerate(keys):
        b = base[k]
        delta = sum(columns[t, i] * tv[k].to(b.device) for t, tv in enumerate(task_vectors))
        out[k] = (b.float() + delta).to(b.dtype)
    return out


def adamerging(ctx: FusionContext, p: AdaMergingParams, layer_wise: bool) -> StateDict:
    base = ctx.base
    keys = [k for k, v in base.items() if mergeable(k, v)]
    task_vectors = ctx.task_vectors()
    shape = (len(ctx.tasks), len(keys)) if layer_wise else (len(ctx.tasks),)
    raw = torch.full(shape, p.init_values, dtype=torch.float32, device=ctx.device, requires_grad=True)
    coefficients = (lambda: raw.clamp(0.0, 1.0)) if p.clamp_weights else (lambda: raw)

    if p.max_steps > 0:
        model = ctx.module(base).requires_grad_(False)
        wrapper = _TaskLogits(model, ctx.logits_fn)
        streams = {t: endless_inputs(ctx, t, p.batch_size) for t in ctx.tasks}
        optimizer = torch.optim.Adam([raw], lr=p.lr, betas=(0.9, 0.999))
        for _ in range(p.max_steps):
            weights = {f"model.{k}": v for k, v in merge(base, keys, task_vectors, coefficients()).items()}
            loss = sum(entropy(functional_call(wrapper, weights, (t, next(streams[t])), strict=False))
                       for t in ctx.tasks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    with torch.no_grad():
        merged = merge(base, keys, task_vectors, coefficients())
    return {k: (merged[k].detach() if k in merged else v.clone()) for k, v in base.items()}
