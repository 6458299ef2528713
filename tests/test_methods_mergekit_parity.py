"""Differential tests: fbh's mergekit-derived merges equal mergekit 0.1.5's on the same tensors (<= 1e-5).

mergekit is a test-only dependency (pyproject's `test` extra). Its merge methods run here
tensor by tensor through their own entry point (`merge_group` on a TensorGroup whose base
is the pre-trained tensor), with the parameters fbh's params map to. Where fbh extends or
deliberately differs from mergekit, the test says so and asserts the difference.
"""

from __future__ import annotations

import pytest
import torch

from harness import registry
from harness.api import FusionContext

mergekit = pytest.importorskip("mergekit", reason="mergekit is in the test extra")
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import PerInputValues, TensorGroup  # noqa: E402
from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp  # noqa: E402

TOL = 1e-5


def state(seed: int, like: dict | None = None, scale: float = 0.1, keep: float = 1.0) -> dict:
    """A state dict with 2-D, 1-D and 4-D float entries and an integer one; with `like`, that
    state plus seeded noise on a `keep` fraction of each float entry."""
    g = torch.Generator().manual_seed(seed)
    if like is None:
        return {"layer.weight": torch.randn(7, 5, generator=g), "layer.bias": torch.randn(7, generator=g),
                "conv.weight": torch.randn(4, 3, 2, 2, generator=g), "head.weight": torch.randn(3, 7, generator=g),
                "position_ids": torch.arange(5)}
    return {k: (v + scale * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < keep)
                if v.is_floating_point() else v.clone()) for k, v in like.items()}


BASE = state(0)
EXPERTS = [state(i, BASE) for i in (1, 2, 3)]


def fuse(name: str, experts=EXPERTS, seed: int = 0, **params) -> dict:
    info = registry.get(name)
    return info.fn(FusionContext.from_state_dicts(BASE, list(experts), seed=seed), info.validate_params(params))


def per_expert(value, n: int) -> PerInputValues:
    """A mergekit per-input parameter for experts 1..n (input 0 is the base)."""
    return PerInputValues([(i, value[i - 1] if isinstance(value, list) else value) for i in range(1, n + 1)])


def mergekit_merge(name: str, experts=EXPERTS, with_base: bool = True, **params) -> dict:
    """mergekit's method `name` applied to every float entry; the integer entry is the base's."""
    method = mk_registry.get(name)
    out = {}
    for k, b in BASE.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        tensors = [e[k] for e in experts]
        group = (TensorGroup.from_tensors([b, *tensors], base_index=0) if with_base
                 else TensorGroup.from_tensors(tensors, ids=range(1, len(tensors) + 1)))
        out[k] = method.merge_group(group, **params)
    return out


def assert_close(ours: dict, theirs: dict, tol: float = TOL):
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        gap = float((ours[k].float() - theirs[k].float()).abs().max())
        assert gap <= tol, f"{k}: fbh and mergekit differ by {gap:.3g}"


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce(select_topk):
    theirs = mergekit_merge("sce", int8_mask=False, select_topk=select_topk)
    assert_close(fuse("sce", select_topk=select_topk), theirs)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("relative_to_base", [True, False])
def test_nuslerp_two_experts(flatten, row_wise, relative_to_base):
    two = EXPERTS[:2]
    theirs = mergekit_merge("nuslerp", two, with_base=relative_to_base, weight=per_expert([0.7, 0.3], 2),
                            nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    ours = fuse("nuslerp", two, t=0.3, flatten=flatten, row_wise=row_wise, relative_to_base=relative_to_base)
    assert_close(ours, theirs)


def test_nuslerp_three_experts_is_a_running_spherical_mean_where_mergekit_refuses():
    """fbh's documented extension: m_1 = tau_1, m_i = nuslerp(1/i, m_{i-1}, tau_i); mergekit needs exactly two."""
    assert mk_registry.get("nuslerp").spec.contract.max_non_base == 2
    ours = fuse("nuslerp")
    for k, b in BASE.items():
        if b.is_floating_point():
            running = EXPERTS[0][k] - b
            for i, e in enumerate(EXPERTS[1:], start=2):
                running = mk_nuslerp(1 / i, running, e[k] - b, flatten=True)
            assert torch.allclose(ours[k], b + running, atol=TOL), k


@pytest.mark.parametrize("relative_to_base", [True, False])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_multislerp(relative_to_base, weights):
    theirs = mergekit_merge("multislerp", with_base=relative_to_base, weight=per_expert(weights or 1.0, 3),
                            normalize_weights=True, eps=1e-8)
    by_task = None if weights is None else {f"task{i}": w for i, w in enumerate(weights)}
    assert_close(fuse("multislerp", weights=by_task, relative_to_base=relative_to_base), theirs)


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher(max_iter):
    theirs = mergekit_merge("karcher", with_base=False, max_iter=max_iter, tol=1e-5)
    assert_close(fuse("karcher", max_iter=max_iter), theirs)


@pytest.mark.parametrize("rescale,normalize", [(True, False), (False, True)])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.1)])
def test_della_linear_with_the_same_seed(rescale, normalize, density, epsilon):
    """mergekit draws its Bernoulli masks from torch's global generator, tensor by tensor and
    expert by expert; fbh draws the same sequence from the run's seeded generator."""
    torch.manual_seed(5)
    theirs = mergekit_merge("della_linear", int8_mask=False, normalize=normalize, rescale=rescale,
                            **{"lambda": 0.3}, weight=per_expert(1.0, 3), density=per_expert(density, 3),
                            epsilon=per_expert(epsilon, 3))
    ours = fuse("della_linear", seed=5, density=density, epsilon=epsilon, rescale=rescale, normalize=normalize)
    assert_close(ours, theirs)


def test_della_linear_keeps_a_one_entry_row_finite_where_mergekit_divides_by_zero():
    from methods.della_linear import magprune
    column = torch.randn(4, 1)
    pruned = magprune(column, 0.5, 0.15, True, torch.Generator().manual_seed(0))
    assert torch.isfinite(pruned).all()
    with pytest.raises(RuntimeError):  # mergekit: rank range 0 -> NaN probabilities -> bernoulli refuses
        from mergekit.sparsify import della_magprune
        della_magprune(column, 0.5, 0.15)


@pytest.mark.parametrize("density,gamma", [(0.14, 0.01), (0.5, 0.1), (0.95, 0.1)])
@pytest.mark.parametrize("rescale,normalize", [(False, False), (True, True)])
def test_breadcrumbs_ties(density, gamma, rescale, normalize):
    theirs = mergekit_merge("breadcrumbs_ties", int8_mask=False, normalize=normalize, rescale=rescale,
                            **{"lambda": 0.3}, weight=per_expert(1.0, 3), density=per_expert(density, 3),
                            gamma=per_expert(gamma, 3))
    assert_close(fuse("breadcrumbs_ties", density=density, gamma=gamma, rescale=rescale, normalize=normalize), theirs)


SPARSE_EXPERTS = [state(i, BASE, keep=0.3) for i in (4, 5, 6)]  # RAM's setting: few entries change


@pytest.mark.parametrize("variant,mk_name,extra",
                         [("ram", "ram", {}), ("ram_plus", "ramplus_tl", {"r": 0.1, "alpha": 0.2})])
def test_ram(variant, mk_name, extra):
    theirs = mergekit_merge(mk_name, SPARSE_EXPERTS, epsilon=1e-5, **extra)
    assert_close(fuse("ram", SPARSE_EXPERTS, variant=variant), theirs)
    unique = fuse("ram", SPARSE_EXPERTS[:1], variant=variant)  # one expert: every change is its own
    assert_close(unique, SPARSE_EXPERTS[0])
