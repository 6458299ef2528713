"""Building blocks for mixing methods: upscaled modules that replace parts of a model.

A mixing method builds ctx.module() (a runnable copy of the base architecture) and swaps
some submodules for the modules here, so the result keeps the model's interface
(`model(pixel_values=x).pooler_output`) while holding more parameters. Transformer
encoders are found generically: the blocks are the first nn.ModuleList named '...layers',
and each block's feed-forward part is its `mlp` child.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from harness.tensors import StateDict


# ----------------------------------------------------------------------------- locating parts

def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the transformer blocks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return name, module
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers'; cannot find its blocks")


def mlp_names(model: nn.Module) -> list[str]:
    """Qualified names of every block's feed-forward module."""
    prefix, layers = encoder_layers(model)
    names = [f"{prefix}.{i}.mlp" for i, block in enumerate(layers) if hasattr(block, "mlp")]
    if not names:
        raise ValueError("the encoder blocks have no `mlp` submodule")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sub_state(state: StateDict, prefix: str) -> StateDict:
    """Entries under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def held_like(module: nn.Module) -> dict:
    """device= and dtype= of a module's parameters, for new layers added beside them (a router
    in a bfloat16 suite's model is bfloat16 too, on the same device)."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- MoE of whole MLPs

class MoEMLP(nn.Module):
    """Token-level mixture of expert MLPs: out = sum_{i in top_k} softmax(router(x))_i * expert_i(x).

    top_k=None uses every expert. A zero-initialised router gives every expert the same
    weight (an average of the experts' outputs) until it is trained.
    """

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, top_k: int | None = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.top_k = min(top_k or len(experts), len(experts))
        self.router = nn.Linear(hidden_size, len(experts), bias=False, **held_like(experts[0]))
        nn.init.zeros_(self.router.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.router(hidden)
        if self.top_k < len(self.experts):
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        weights = logits.softmax(dim=-1)
        outs = torch.stack([e(hidden) for e in self.experts], dim=-1)
        return (outs * weights.unsqueeze(-2)).sum(-1)


# ----------------------------------------------------------------------------- weight-ensembling MoE

class _EnsembledLinear(nn.Module):
    """A linear layer whose weights are W + sum_i r_i tau_i for per-example r set by its block."""

    def __init__(self, linear: nn.Linear, weight_tvs: Tensor, bias_tvs: Tensor | None):
        super().__init__()
        self.linear = linear
        self.weight_tvs = nn.Parameter(weight_tvs, requires_grad=False)   # [E, out, in]
        self.bias_tvs = None if bias_tvs is None else nn.Parameter(bias_tvs, requires_grad=False)  # [E, out]
        self.routing: Tensor | None = None                                # [batch, E], set per forward

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing
        delta_w = torch.einsum("be,eoi->boi", r, self.weight_tvs)           # one delta per example
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = self.linear(x) + torch.bmm(flat, delta_w.transpose(1, 2)).view(*x.shape[:-1], -1)
        if self.bias_tvs is not None:
            out = out + (r @ self.bias_tvs).view(r.shape[0], *([1] * (x.dim() - 2)), -1)
        return out


class WeightEnsemblingMLP(nn.Module):
    """WEMoE block: per example, the MLP's linear weights are base + sum_i r_i(x) * tau_i.

    r(x) is a router MLP on the block's input, averaged over tokens; each example gets its
    own merged weights, so a prediction never depends on the other examples of its batch.
    Only nn.Linear layers inside the MLP are ensembled (other MLP parameters, if any, stay
    pre-trained).
    """

    def __init__(self, base_mlp: nn.Module, task_vectors: Sequence[StateDict], hidden_size: int,
                 router_hidden_layers: int, init_lambda: float, generator: torch.Generator):
        super().__init__()
        self.mlp = base_mlp
        for p in self.mlp.parameters():
            p.requires_grad_(False)
        self._ensembled: list[_EnsembledLinear] = []
        for name, layer in list(base_mlp.named_modules()):
            if isinstance(layer, nn.Linear):
                bias = None if layer.bias is None else torch.stack([tv[f"{name}.bias"] for tv in task_vectors])
                weights = torch.stack([tv[f"{name}.weight"] for tv in task_vectors])
                wrapped = _EnsembledLinear(layer, weights.to(layer.weight.dtype),
                                           None if bias is None else bias.to(layer.weight.dtype))
                set_submodule(self.mlp, name, wrapped)
                self._ensembled.append(wrapped)
        layers: list[nn.Module] = []
        like = held_like(base_mlp)
        for _ in range(router_hidden_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size, **like), nn.ReLU()]
        layers.append(nn.Linear(hidden_size, len(task_vectors), **like))
        self.router = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.router:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=generator))
                    m.bias.zero_()
            self.router[-1].bias.fill_(init_lambda)

    def forward(self, hidden: Tensor) -> Tensor:
        r = self.router(hidden).mean(dim=1)  # [batch, experts]
        for layer in self._ensembled:
            layer.routing = r
        try:
            return self.mlp(hidden)
        finally:
            for layer in self._ensembled:
                layer.routing = None


# ----------------------------------------------------------------------------- SMILE

class SmileMoELinear(nn.Module):
    """SMILE: pre-trained linear plus a sparse mixture of low-rank task-vector experts.

    Expert i is the rank-k SVD of its weight difference (plus its bias difference); the
    router scores expert i on a token by ||V_i[:, :gate_k]^T x||_2 (the input's energy in
    the expert's top right-singular subspace), takes the top_k softmax weights and
    renormalises them. No parameters are trained.
    """

    def __init__(self, pretrained: nn.Linear, finetuned: Sequence[nn.Linear], gate_k: int, k: int, top_k: int):
        super().__init__()
        self.pretrained = pretrained
        self.top_k = min(top_k, len(finetuned))
        gates, us, svhs, biases = [], [], [], []
        for m in finetuned:
            diff = (m.weight - pretrained.weight).detach().float()
            u, s, vh = torch.linalg.svd(diff, full_matrices=False)
            gates.append(vh[:gate_k])
            us.append(u[:, :k])
            svhs.append(s[:k, None] * vh[:k])
            biases.append((m.bias - pretrained.bias).detach() if pretrained.bias is not None
                          else torch.zeros(pretrained.out_features, device=pretrained.weight.device))
        dtype = pretrained.weight.dtype  # the SVD runs in float32; the factors are held like the model
        self.gate = nn.Parameter(torch.stack(gates).to(dtype), requires_grad=False)       # [E, gate_k, in]
        self.u = nn.Parameter(torch.stack(us).to(dtype), requires_grad=False)             # [E, out, k]
        self.svh = nn.Parameter(torch.stack(svhs).to(dtype), requires_grad=False)         # [E, k, in]
        self.bias_delta = nn.Parameter(torch.stack(biases).to(dtype), requires_grad=False)  # [E, out]

    @property
    def weight(self) -> Tensor:  # callers read a linear layer's dtype/device from .weight
        return self.pretrained.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.pretrained(x)
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.einsum("egi,ti->teg", self.gate.to(flat.dtype), flat).norm(dim=-1)  # [T, E]
        probs = scores.softmax(dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
        low_rank = torch.einsum("eok,eki,ti->teo", self.u, self.svh, flat) + self.bias_delta
        mixed = (weights.unsqueeze(-1) * low_rank.to(flat.dtype)).sum(1)
        return out + mixed.reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- whole-model builders

def upscale_mlps(ctx, shared_state: StateDict, top_k: int | None) -> nn.Module:
    """ctx.module(shared_state) with every block's MLP replaced by a MoEMLP of the experts' MLPs."""
    model = ctx.module(shared_state)
    hidden = model.config.hidden_size
    expert_modules = [ctx.module(e) for e in ctx.experts]
    for name in mlp_names(model):
        experts = [copy.deepcopy(m.get_submodule(name)) for m in expert_modules]
        set_submodule(model, name, MoEMLP(experts, hidden, top_k).to(ctx.device))
    return model.eval()
