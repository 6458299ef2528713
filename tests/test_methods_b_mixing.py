"""Mixing methods (MoE upscaling/merging, WEMoE, SMILE, depth upscaling, recombination) on a
tiny CLIPVisionModel: forward works, output shape and parameter count are as declared,
degenerate settings reproduce a known model, and SMILE / recombination equal fusion-bench."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from harness import registry
from harness.api import DataAccessError, FusionContext
from harness.moe import MoEMLP, SmileMoELinear, count_parameters

CONFIG = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                          image_size=8, patch_size=4)
TASKS = ["a", "b", "c"]


def tiny_states():
    torch.manual_seed(0)
    base = CLIPVisionModel(CONFIG).eval()
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    experts = {}
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        experts[t] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                      for k, v in base_sd.items()}
    return base, base_sd, experts


TEMPLATE, BASE, EXPERTS = tiny_states()
HEADS = {t: torch.randn(3, CONFIG.hidden_size, generator=torch.Generator().manual_seed(10 + i))
         for i, t in enumerate(TASKS)}
INPUTS = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(99))


def build(state):
    model = copy.deepcopy(TEMPLATE)
    model.load_state_dict(state)
    return model.eval()


def logits(model, task, x):
    return 10 * F.normalize(model(pixel_values=x).pooler_output, dim=-1) @ HEADS[task].T


def context(name, experts=EXPERTS, seed=0):
    return FusionContext.from_state_dicts(
        BASE, experts, build_module=build, logits_fn=logits, seed=seed, data_access=registry.get(name).data,
        data_fn=lambda task, split: (INPUTS, torch.zeros(len(INPUTS), dtype=torch.long)))


def fuse(name, experts=EXPERTS, seed=0, **params):
    info = registry.get(name)
    return info.fn(context(name, experts, seed), info.validate_params(params))


def pooled(model, x=INPUTS):
    with torch.no_grad():
        return model(pixel_values=x).pooler_output


BASE_PARAMS = count_parameters(TEMPLATE)
MLP_PARAMS = sum(p.numel() for n, p in TEMPLATE.named_parameters() if ".mlp." in n)
ALL_MIXING = ["moe_upscaling", "moe_merging", "smile_upscaling", "depth_upscaling", "model_recombination"]


@pytest.mark.parametrize("name", ALL_MIXING + ["we_moe"])
def test_forward_keeps_the_interface_and_output_shape(name):
    params = {"max_steps": 1} if name == "we_moe" else {}
    model = fuse(name, **params)
    if isinstance(model, dict):
        model = build(model)
    out = pooled(model)
    assert out.shape == pooled(TEMPLATE).shape and torch.isfinite(out).all()


def test_moe_parameter_counts_are_as_declared():
    n = len(TASKS)
    for name in ["moe_upscaling", "moe_merging"]:
        assert registry.get(name).output == "larger"
        routers = CONFIG.num_hidden_layers * CONFIG.hidden_size * n
        assert count_parameters(fuse(name)) == BASE_PARAMS + (n - 1) * MLP_PARAMS + routers


def test_moe_of_identical_experts_is_that_model():
    same = {t: EXPERTS["a"] for t in TASKS}
    upscaled = fuse("moe_upscaling", experts=same)
    # shared weights are the base's, MLPs all expert a's: equal to base with expert a's MLPs
    mixed = {k: (EXPERTS["a"][k] if ".mlp." in k else BASE[k]) for k in BASE}
    assert torch.allclose(pooled(upscaled), pooled(build(mixed)), atol=1e-5)
    merged = fuse("moe_merging", experts=same, scaling_factor=1.0 / len(TASKS))
    assert torch.allclose(pooled(merged), pooled(build(EXPERTS["a"])), atol=1e-5)


def test_moe_router_top_k_selects_experts():
    experts = [nn.Linear(4, 4) for _ in range(3)]
    moe = MoEMLP(experts, 4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 100.0  # expert 2 wins on positive inputs
    x = torch.rand(5, 4) + 0.1
    assert torch.allclose(moe(x), experts[2](x), atol=1e-5)


def test_smile_matches_fusion_bench_linear():
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear as FbSmile
    torch.manual_seed(0)
    pre = nn.Linear(12, 8)
    fts = [copy.deepcopy(pre) for _ in range(3)]
    for m in fts:
        m.weight.data += 0.3 * torch.randn_like(m.weight)
        m.bias.data += 0.3 * torch.randn_like(m.bias)
    x = torch.randn(2, 5, 12)
    for gate_k, k, top_k in [(1, 128, 1), (2, 3, 2)]:
        ours = SmileMoELinear(copy.deepcopy(pre), fts, gate_k, k, top_k)
        theirs = FbSmile(copy.deepcopy(pre), [copy.deepcopy(m) for m in fts], gate_k=gate_k, k=k, top_k=top_k,
                         full_matrices=False)  # FusionBench crashes with full_matrices and k > rank
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_smile_with_one_expert_at_full_rank_is_that_expert():
    model = fuse("smile_upscaling", experts={"a": EXPERTS["a"]}, k=128)
    # every linear layer reproduces expert a exactly; non-linear modules (norms, embeddings) stay pre-trained
    mixed = {k: (EXPERTS["a"][k] if any(s in k for s in ("proj", "fc1", "fc2")) else BASE[k]) for k in BASE}
    assert torch.allclose(pooled(model), pooled(build(mixed)), atol=1e-4)
    assert count_parameters(model) > BASE_PARAMS


def test_depth_upscaling_stacks_solar_layers():
    model = fuse("depth_upscaling", source="base")
    assert model.config.num_hidden_layers == 6 and len(model.encoder.layers) == 6  # [0,1,2] + [1,2,3]
    per_layer = sum(p.numel() for p in TEMPLATE.encoder.layers[0].parameters())
    assert count_parameters(model) == BASE_PARAMS + 2 * per_layer
    same = fuse("depth_upscaling", source="base", layer_indices=[0, 1, 2, 3])
    assert torch.allclose(pooled(same), pooled(TEMPLATE), atol=1e-6)
    with pytest.raises(ValueError, match="layer_indices"):
        fuse("depth_upscaling", layer_indices=[7])


def test_we_moe_starts_as_task_arithmetic_reads_only_unlabeled_test_and_is_seeded():
    info = registry.get("we_moe")
    assert info.data == "unlabeled_test" and info.trains and info.output == "larger"
    untrained = fuse("we_moe", max_steps=0, router_hidden_layers=1)
    with torch.no_grad():  # a depth-1 router's weights are ~0 at init, so r_i ~ init_lambda
        for m in untrained.modules():
            if hasattr(m, "router"):
                m.router[-1].weight.zero_()
    ta = fuse("task_arithmetic", scaling_factor=0.3)
    assert torch.allclose(pooled(untrained), pooled(build(ta)), atol=1e-5)
    a = fuse("we_moe", max_steps=3, lr=1e-2, seed=1)
    b = fuse("we_moe", max_steps=3, lr=1e-2, seed=1)
    assert torch.equal(pooled(a), pooled(b))
    ctx = context("we_moe")
    with pytest.raises(DataAccessError):
        next(ctx.batches("a", "validation"))
    assert next(ctx.batches("a", "test"))[1] is None


def test_we_moe_training_lowers_entropy():
    from methods.we_moe import entropy

    def total_entropy(model):
        with torch.no_grad():
            return sum(float(entropy(logits(model, t, INPUTS))) for t in TASKS)

    before = total_entropy(fuse("we_moe", max_steps=0))
    after = total_entropy(fuse("we_moe", max_steps=8, lr=3e-2))
    assert after < before


def test_model_recombination_takes_whole_blocks_and_is_seeded():
    out = fuse("model_recombination", seed=3)
    for i in range(CONFIG.num_hidden_layers):
        keys = [k for k in BASE if k.startswith(f"encoder.layers.{i}.")]
        sources = {next(t for t in TASKS if torch.equal(out[k], EXPERTS[t][k])) for k in keys}
        assert len(sources) == 1
    again = fuse("model_recombination", seed=3)
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = fuse("model_recombination", seed=4)
    assert any(not torch.equal(out[k], other[k]) for k in out)


def test_model_recombination_entry_granularity_equals_fusion_bench():
    from fusion_bench.method.model_recombination import recombine_state_dict
    experts = [build(EXPERTS[t]) for t in TASKS]
    random.seed(5)
    theirs = recombine_state_dict(experts)[0].state_dict()
    ours = fuse("model_recombination", seed=5, granularity="entry")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
