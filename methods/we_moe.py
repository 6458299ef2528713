"""WEMoE: weight-ensembling mixture of experts, routers trained by test-time entropy minimisation.

Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
ICML 2024. arXiv:2402.00433

Shared (non-MLP) weights are task arithmetic with lambda = init_lambda. Every block's MLP
computes with weights theta_pre + sum_i r_i(x) tau_i, where r is a small router MLP on
the block input (averaged over tokens) initialised so that r_i = init_lambda (task
arithmetic). Only the routers are trained: Adam on the summed prediction entropy of
every task's unlabelled test inputs (data access: unlabeled_test; labels are never
seen), each task's inputs shuffled epoch after epoch in an order seeded by the run's seed
and the task's name (as AdaMerging's are). The parameter defaults are the paper's /
FusionBench's (router_hidden_layers 2, init_lambda 0.3, lr 1e-4, batch 16, 1000 steps);
a submission may run other settings to fit a suite's fusion budget and says so in its
description. fbh merges weights per example, where FusionBench's batch_reduce averages
routing over the batch.
"""

import copy

import torch
from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.moe import WeightEnsemblingMLP, mlp_names, set_submodule, sub_state
from harness.tensors import apply_delta
from methods._adamerging import endless_inputs
from methods._common import sum_task_vectors


class WeMoEParams(Params):
    init_lambda: float = Field(0.3, ge=0.0, le=10.0)
    router_hidden_layers: int = Field(2, ge=1, le=4)
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    batch_size: int = Field(16, ge=1, le=4096)
    max_steps: int = Field(1000, ge=0, le=100_000, description="optimizer steps; each sees one batch of every task")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def build_we_moe(ctx: FusionContext, p: WeMoEParams) -> torch.nn.Module:
    tvs = ctx.task_vectors()
    model = ctx.module(apply_delta(ctx.base, sum_task_vectors(tvs), p.init_lambda))
    base_model = ctx.module(ctx.base)
    g = ctx.generator()
    for name in mlp_names(model):
        block = WeightEnsemblingMLP(copy.deepcopy(base_model.get_submodule(name)), [sub_state(tv, name) for tv in tvs],
                                    model.config.hidden_size, p.router_hidden_layers, p.init_lambda, g)
        set_submodule(model, name, block.to(ctx.device))
    return model


@method("we_moe", params=WeMoEParams, category="mixing", data="unlabeled_test", output="larger",
        trains=True, stochastic=True)
def we_moe(ctx: FusionContext, p: WeMoEParams):
    model = build_we_moe(ctx, p)
    routers = [prm for n, prm in model.named_parameters() if ".router." in n]
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in routers:
        prm.requires_grad_(True)
    optimizer = torch.optim.Adam(routers, lr=p.lr)
    streams = {t: endless_inputs(ctx, t, p.batch_size) for t in ctx.tasks}
    model.train()
    for _ in range(p.max_steps):
        loss = sum(entropy(ctx.logits(model, t, next(streams[t]))) for t in ctx.tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()
