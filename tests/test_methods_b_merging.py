"""Merging methods beyond the paper (DARE, Breadcrumbs, MagMax, Model Stock, SLERP, TSV-M,
Iso-C/CTS, DELLA): properties on small random state dicts, and equality with
fusion-bench 0.2.33 on the same tiny models where it implements the method."""

import copy

import pytest
import torch
from torch import nn

from harness import registry
from harness.api import FusionContext


def random_state(seed: int, like: dict | None = None, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if like is None:
        return {"layer.weight": torch.randn(6, 5, generator=g), "layer.bias": torch.randn(6, generator=g),
                "conv.weight": torch.randn(4, 3, 2, 2, generator=g), "proj.weight": torch.randn(3, 6, generator=g),
                "position_ids": torch.arange(5)}
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in like.items()}


BASE = random_state(0)
EXPERTS = [random_state(i, BASE) for i in (1, 2, 3)]


def fuse(name, base, experts, seed=0, **params):
    info = registry.get(name)
    ctx = FusionContext.from_state_dicts(base, list(experts), seed=seed)
    return info.fn(ctx, info.validate_params(params))


def assert_state_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k].float() - b[k].float()).abs().max())


# Scaling-zero, one-expert, expert-order and dtype properties of every merging method are
# tested registry-wide in tests/test_methods_a.py; this file keeps the methods' own math.


@pytest.mark.parametrize("name,params", [("dare", {}), ("dare", {"merge": "ties"}), ("della", {})])
def test_stochastic_methods_are_seeded(name, params):
    assert registry.get(name).stochastic
    a, b = fuse(name, BASE, EXPERTS, seed=7, **params), fuse(name, BASE, EXPERTS, seed=7, **params)
    assert_state_close(a, b, atol=0)
    c = fuse(name, BASE, EXPERTS, seed=8, **params)
    assert not torch.equal(a["layer.weight"], c["layer.weight"])


def test_dare_simple_average_without_drop_is_the_average():
    out = fuse("dare", BASE, EXPERTS, merge="simple_average", sparsity_ratio=0.0)
    avg = fuse("simple_average", BASE, EXPERTS)
    assert_state_close(out, avg)


def test_dare_drops_the_requested_fraction_and_rescales():
    base = {"w": torch.zeros(20000)}
    out = fuse("dare", base, [{"w": torch.ones(20000)}], sparsity_ratio=0.75, scaling_factor=1.0)
    kept = out["w"] != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.allclose(out["w"][kept], torch.full((int(kept.sum()),), 4.0))


def test_breadcrumbs_masks_smallest_and_largest_per_tensor():
    base = {"w": torch.zeros(10)}
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    out = fuse("breadcrumbs", base, [{"w": tau}], drop_small=0.3, drop_large=0.2, scaling_factor=1.0)
    expected = tau.clone()
    expected[[0, 1, 2, 8, 9]] = 0  # three smallest and two largest magnitudes
    assert torch.equal(out["w"], expected)


def test_della_keeps_large_entries_more_often_and_rescales():
    from methods.della import drop_probabilities, magprune
    t = torch.linspace(0.01, 1, 101) * torch.tensor([1.0, -1.0]).repeat(51)[:101]
    p = drop_probabilities(t, 0.5, 0.2)
    assert p[t.abs().argmax()] == pytest.approx(0.4) and p[t.abs().argmin()] == pytest.approx(0.6)
    assert p.mean() == pytest.approx(0.5, abs=1e-6)
    pruned = magprune(t, 0.5, 0.2, torch.Generator().manual_seed(0))
    kept = pruned != 0
    assert 0 < kept.sum() < len(t)
    assert torch.allclose(pruned[kept], t[kept] / (1 - p[kept]))


def test_model_stock_identical_experts_return_the_expert_and_one_expert_is_an_error():
    assert_state_close(fuse("model_stock", BASE, [EXPERTS[0]] * 3), EXPERTS[0])
    with pytest.raises(ValueError, match="at least two"):
        fuse("model_stock", BASE, EXPERTS[:1])


def test_slerp_endpoints_and_symmetry():
    assert_state_close(fuse("slerp", BASE, EXPERTS[:2], t=0.0), EXPERTS[0])
    assert_state_close(fuse("slerp", BASE, EXPERTS[:2], t=1.0), EXPERTS[1])
    assert_state_close(fuse("slerp", BASE, EXPERTS[:2], t=0.3), fuse("slerp", BASE, EXPERTS[1::-1], t=0.7))


def test_iso_c_flattens_the_spectrum_of_summed_matrices():
    out = fuse("iso_c", BASE, EXPERTS)
    s = torch.linalg.svdvals(out["layer.weight"] - BASE["layer.weight"])
    assert torch.allclose(s, s.mean().expand_as(s), atol=1e-5)
    mean_bias = torch.stack([e["layer.bias"] - BASE["layer.bias"] for e in EXPERTS]).mean(0)
    assert torch.allclose(out["layer.bias"], BASE["layer.bias"] + mean_bias, atol=1e-6)


# ----------------------------------------------------------------------------- fusion-bench 0.2.33

def tiny_pool(n_experts=3):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4))
    experts = []
    for _ in range(n_experts):
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        experts.append(m)
    return base, experts


def states(base, experts):
    return ({k: v.detach().clone() for k, v in base.state_dict().items()},
            [{k: v.detach().clone() for k, v in e.state_dict().items()} for e in experts])


def fb_run(algorithm, base, experts, seed=None):
    from fusion_bench import BaseModelPool
    pool = BaseModelPool({"_pretrained_": copy.deepcopy(base),
                          **{f"t{i}": copy.deepcopy(e) for i, e in enumerate(experts)}})
    if seed is not None:
        torch.manual_seed(seed)
    return {k: v.detach() for k, v in algorithm.run(pool).state_dict().items()}


def fb_task_vectors(base_sd, expert_sds):
    return [{k: e[k] - base_sd[k] for k in base_sd} for e in expert_sds]


def test_dare_task_arithmetic_equals_fusion_bench_with_the_same_seed():
    from fusion_bench.method import DareTaskArithmetic
    base, experts = tiny_pool()
    ours = fuse("dare", *states(base, experts), seed=11)
    theirs = fb_run(DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=False),
                    base, experts, seed=11)
    assert_state_close(ours, theirs)


def test_dare_ties_equals_fusion_bench_with_the_same_seed():
    from fusion_bench.method.dare import DareTiesMerging
    base, experts = tiny_pool()
    ours = fuse("dare", *states(base, experts), seed=5, merge="ties")
    theirs = fb_run(DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True,
                                    scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum"),
                    base, experts, seed=5)
    assert_state_close(ours, theirs)


@pytest.mark.parametrize("n_experts", [2, 3])
def test_model_stock_equals_fusion_bench(n_experts):
    from fusion_bench.method import ModelStock
    base, experts = tiny_pool(n_experts)
    assert_state_close(fuse("model_stock", *states(base, experts)), fb_run(ModelStock(), base, experts))


def test_magmax_equals_fusion_bench():
    from fusion_bench.method import MagMaxAlgorithm
    base, experts = tiny_pool()
    assert_state_close(fuse("magmax", *states(base, experts)),
                       fb_run(MagMaxAlgorithm(scaling_factor=0.5), base, experts))


def test_slerp_equals_fusion_bench():
    from fusion_bench.method.slerp.slerp import slerp_on_state_dicts
    base_sd, (e1, e2) = states(*tiny_pool(2))
    assert_state_close(fuse("slerp", base_sd, [e1, e2], t=0.3), slerp_on_state_dicts(0.3, e1, e2))


def test_tsv_merging_equals_fusion_bench():
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    base_sd, expert_sds = states(*tiny_pool())
    merged = compute_and_sum_svd_mem_reduction(fb_task_vectors(base_sd, expert_sds), accelerator="cpu")
    theirs = {k: base_sd[k] + merged[k] for k in base_sd}
    assert_state_close(fuse("tsv_merging", base_sd, expert_sds), theirs)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_isotropic_merging_equals_fusion_bench(name):
    from fusion_bench.method.isotropic_merging import iso_utils
    base_sd, expert_sds = states(*tiny_pool())
    tvs = fb_task_vectors(base_sd, expert_sds)
    merged = (iso_utils.iso_c(tvs, accelerator="cpu") if name == "iso_c"
              else iso_utils.iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"))
    assert_state_close(fuse(name, base_sd, expert_sds), {k: base_sd[k] + merged[k] for k in base_sd})
