"""The four slice methods' math on small tensors, against formulas written out by hand."""

import pytest
import torch

from harness import registry
from harness.api import Ensemble, FusionContext


def sd(*values, dtype=torch.float32):
    return {"w": torch.tensor(values, dtype=dtype), "b": torch.tensor([values[0]], dtype=dtype),
            "ids": torch.arange(3)}


def run(name, base, experts, **params):
    info = registry.get(name)
    return info.fn(FusionContext.from_state_dicts(base, experts), info.validate_params(params))


BASE = sd(0.0, 1.0, 2.0, 3.0)
E1 = sd(1.0, 1.0, 4.0, -1.0)
E2 = sd(3.0, 0.0, 2.0, 1.0)


def test_simple_average_is_elementwise_mean():
    out = run("simple_average", BASE, [E1, E2])
    assert torch.allclose(out["w"], torch.tensor([2.0, 0.5, 3.0, 0.0]))
    assert torch.equal(out["ids"], BASE["ids"])


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    out = run("task_arithmetic", BASE, [E1, E2], scaling_factor=0.5)
    tv_sum = (E1["w"] - BASE["w"]) + (E2["w"] - BASE["w"])
    assert torch.allclose(out["w"], BASE["w"] + 0.5 * tv_sum)


def test_task_arithmetic_scaling_zero_is_base_and_one_expert_scaling_one_is_expert():
    assert torch.equal(run("task_arithmetic", BASE, [E1, E2], scaling_factor=0.0)["w"], BASE["w"])
    assert torch.allclose(run("task_arithmetic", BASE, [E1], scaling_factor=1.0)["w"], E1["w"])


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = {"w": torch.zeros(4)}
    e1 = {"w": torch.tensor([4.0, -1.0, 2.0, 0.5])}
    e2 = {"w": torch.tensor([-3.0, 2.0, 2.0, 0.1])}
    e3 = {"w": torch.tensor([1.0, -3.0, -5.0, 0.2])}
    out = run("ties_merging", base, [e1, e2, e3], scaling_factor=1.0, top_k=0.5)
    # Trim as TIES/FusionBench do: keep |x| >= the (d - int(d*k))-th smallest magnitude, so ties
    # and the threshold itself survive: e1 -> [4, -1, 2, 0], e2 -> [-3, 2, 2, 0], e3 -> [1, -3, -5, 0].
    # Elected signs of the sums: +, -, -, and index 3 (sum 0) takes the majority sign (-).
    # Disjoint mean of agreeing entries: [(4+1)/2, (-1-3)/2, -5, 0]; disjoint sum: [5, -4, -5, 0].
    assert torch.allclose(out["w"], torch.tensor([2.5, -2.0, -5.0, 0.0]))
    summed = run("ties_merging", base, [e1, e2, e3], scaling_factor=1.0, top_k=0.5, disjoint_merge="sum")
    assert torch.allclose(summed["w"], torch.tensor([5.0, -4.0, -5.0, 0.0]))


def test_ties_preserves_dtype_and_scaling_zero_is_base():
    base16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in BASE.items()}
    e = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in E1.items()}
    out = run("ties_merging", base16, [e], scaling_factor=0.0)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], base16["w"])


def test_simple_ensemble_keeps_every_expert():
    out = run("simple_ensemble", BASE, [E1, E2])
    assert isinstance(out, Ensemble) and len(out.members) == 2 and out.reduce == "mean"


@pytest.mark.parametrize("name,params", [("task_arithmetic", {"scaling_factor": "0.3"}),
                                         ("task_arithmetic", {"scale": 0.3}),
                                         ("ties_merging", {"top_k": 1.5}),
                                         ("simple_average", {"anything": 1})])
def test_bad_hyperparameters_are_clear_errors(name, params):
    from harness.errors import FbhError
    with pytest.raises(FbhError) as exc:
        registry.get(name).validate_params(params, file="sub.yaml")
    text = exc.value.render()
    assert "sub.yaml" in text and "params." in text and "accepts" in text


def test_every_method_declares_reference_and_schema():
    methods = registry.discover()
    assert {"simple_average", "task_arithmetic", "ties_merging", "simple_ensemble"} <= set(methods)
    for info in methods.values():
        assert "arxiv" in info.reference.lower() or "doi" in info.reference.lower(), info.name
        assert issubclass(info.params, registry.Params)


@pytest.mark.parametrize("others, expected", [(1.0, 2.0), (-1.0, -2.0)])
def test_ties_cancelled_votes_take_the_whole_vectors_majority_across_entries(others, expected):
    """TIES merges entry by entry, yet an entry whose votes cancel (+2 vs -2 in 'a') still
    takes the majority sign of the whole task vector, decided by the other entries ('b')."""
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    e1 = {"a": torch.tensor([2.0, 1.0]), "b": torch.full((3,), others)}
    e2 = {"a": torch.tensor([-2.0, 1.0]), "b": torch.full((3,), others)}
    out = run("ties_merging", base, [e1, e2], scaling_factor=1.0, top_k=1.0)
    assert torch.equal(out["a"], torch.tensor([expected, 1.0]))
    assert torch.equal(out["b"], torch.full((3,), others))


def test_kth_smallest_equals_kthvalue_on_large_and_tied_vectors():
    from methods.ties_merging import kth_smallest
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5_000_000, generator=g).abs()
    for k in (1, 1_000_000, 4_000_000, 5_000_000):
        assert torch.equal(kth_smallest(x, k), x.kthvalue(k).values), k
    tied = torch.zeros(5_000_000)
    tied[::1000] = 1.0  # 4,995,000 zeros: the bracket is [0, 0]
    assert torch.equal(kth_smallest(tied, 4_000_000), torch.tensor(0.0))
    assert torch.equal(kth_smallest(tied, 4_999_000), torch.tensor(1.0))


def test_ties_trim_and_merge_match_the_textbook_masks_at_the_edges():
    """trim (hardshrink just below each threshold) and the float-only disjoint merge agree with
    FusionBench's mask expressions: a zero threshold keeps everything, entries equal to the
    threshold are kept, subnormals and NaN pass as the masks pass them."""
    from methods.ties_merging import disjoint_merge, trim
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 1000, generator=g)
    rows[:, :300] = 0.0
    rows[0, 300:310] = 0.5
    rows[1, 310] = 1e-45
    rows[2, 311] = float("nan")
    for th in ([0.0, 0.5, 1e-45, 1.0], [0.5, 0.0, 0.0, 2.0]):
        thresholds = torch.tensor(th).unsqueeze(1)
        expected = rows * (rows.abs() >= thresholds)
        trimmed = trim(rows.clone(), thresholds)
        assert torch.equal(trimmed.isnan(), expected.isnan())
        assert torch.equal(trimmed.nan_to_num(), expected.nan_to_num())
        sign = torch.sign(trimmed.sum(0))
        keep = torch.where(sign > 0, expected > 0, expected < 0)
        for how, want in (("sum", (expected * keep).sum(0)), ("mean", (expected * keep).sum(0) / keep.sum(0).clamp(min=1))):
            got = disjoint_merge(trimmed, sign, how)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), how


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_in_cache_sized_pieces_gives_the_same_bits(monkeypatch, merge):
    """The merge pass goes over each entry in pieces of COLUMNS columns; pieces of 3 (with
    cancelled votes spread over several pieces) must give exactly the one-piece result."""
    import methods.ties_merging as ties
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(11, generator=g)}
    experts = [{k: v + torch.randint(-2, 3, v.shape, generator=g).float() for k, v in base.items()} for _ in range(4)]
    whole = run("ties_merging", base, experts, scaling_factor=1.0, top_k=0.6, disjoint_merge=merge)
    monkeypatch.setattr(ties, "COLUMNS", 3)
    pieces = run("ties_merging", base, experts, scaling_factor=1.0, top_k=0.6, disjoint_merge=merge)
    assert all(torch.equal(whole[k], pieces[k]) for k in base)
