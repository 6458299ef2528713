"""Method library part A: data-access contract, merging-method properties, seed determinism.

Every merging method runs on a tiny nn.Module family built here (two linear layers, a
layer norm, an integer buffer, fixed per-task heads and seeded data), so methods that read
data (Fisher, RegMean, AdaMerging) run through the same FusionContext as on a real suite.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from harness import registry, runner
from harness.api import DataAccessError, Ensemble, FusionContext
from harness.registry import Params

TASKS = ["alpha", "beta", "gamma"]
N_EXAMPLES, IN_DIM, CLASSES = 40, 6, 4


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 5)
        self.register_buffer("ids", torch.arange(3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def tiny_states(dtype=torch.float32, tasks=TASKS):
    """(base, {task: expert}) state dicts: experts are the base plus seeded task-specific noise."""
    torch.manual_seed(0)
    base = TinyNet().state_dict()
    experts = {}
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(100 + i)
        experts[t] = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                      for k, v in base.items()}
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return cast(base), {t: cast(e) for t, e in experts.items()}


HEADS = {t: torch.randn(CLASSES, 5, generator=torch.Generator().manual_seed(7 + i)) for i, t in enumerate(TASKS)}


def tiny_data(task: str, split: str):
    g = torch.Generator().manual_seed(10 * TASKS.index(task) + ["train", "validation", "test"].index(split))
    return torch.randn(N_EXAMPLES, IN_DIM, generator=g), torch.randint(0, CLASSES, (N_EXAMPLES,), generator=g)


def tiny_build(state):
    model = TinyNet().to(next(v for v in state.values() if v.is_floating_point()).dtype)
    model.load_state_dict(state)
    return model


def tiny_logits(model, task, inputs):
    dtype = next(model.parameters()).dtype
    return model(inputs.to(dtype)).float() @ HEADS[task].T


def tiny_context(base, experts, data_access="none", seed=0, data_fn=tiny_data, **kwargs) -> FusionContext:
    return FusionContext.from_state_dicts(base, experts, build_module=tiny_build, logits_fn=tiny_logits,
                                          data_fn=data_fn, data_access=data_access, seed=seed, **kwargs)


def fuse(name, base, experts, seed=0, data_fn=tiny_data, **params):
    """Fuse through the runner's own entry point, so declared data access and sample counts apply."""
    info = registry.get(name)
    ctx = tiny_context(base, experts, info.data, seed=seed, data_fn=data_fn)
    return runner.fuse(info, ctx, info.validate_params(params))


# Each merging method declares the hyperparameters of these property tests beside itself
# (@method(properties=registry.Properties(...))), so adding a method edits no test file. The
# experts here are tasks alpha, beta, gamma; the one-expert case merges beta alone.
MERGING = sorted(n for n, i in registry.discover().items() if i.category == "merging")


def declared(name: str) -> registry.Properties | None:
    return registry.get(name).properties


def properties(name: str) -> registry.Properties:
    props = declared(name)
    if props is None:
        pytest.fail(f"merging method '{name}' declares no property-test cases: add "
                    f"properties=Properties(quick=..., scaling_zero=..., one_expert=...) to its @method(...) "
                    f"in {registry.get(name).source_file} (see harness.registry.Properties)")
    return props


def with_case(case: str, names: list[str] = MERGING) -> list[str]:
    """The merging methods whose declared `case` applies, and those that declare nothing (which fail)."""
    return [n for n in names if declared(n) is None or getattr(declared(n), case) is not None]


def assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        gap = float((a[k].float() - b[k].float()).abs().max())
        assert gap <= atol, f"{k}: max difference {gap:.3g} > {atol}"


@pytest.mark.parametrize("name", MERGING)
def test_every_merging_method_declares_its_property_cases(name):
    props = properties(name)
    info = registry.get(name)
    hash(info)  # declaring dicts of params leaves a MethodInfo hashable
    for case in (props.quick, props.scaling_zero, props.one_expert):
        if case is not None:
            info.validate_params(case, file=str(info.source_file), prefix="properties")
    skipped = props.scaling_zero is None or props.one_expert is None or not props.order_invariant
    assert props.why or not skipped, f"'{name}' opts out of a property test: say why in Properties(why=...)"


@pytest.mark.parametrize("name", with_case("scaling_zero"))
def test_scaling_zero_returns_the_base(name):
    base, experts = tiny_states()
    assert_states_close(fuse(name, base, experts, **properties(name).scaling_zero), base, atol=0)


@pytest.mark.parametrize("name", with_case("one_expert"))
def test_one_expert_at_scaling_one_returns_that_expert(name):
    base, experts = tiny_states()
    one = {"beta": experts["beta"]}
    assert_states_close(fuse(name, base, one, **properties(name).one_expert), experts["beta"])


@pytest.mark.parametrize("name", [n for n in MERGING if declared(n) is None or declared(n).order_invariant])
def test_expert_order_does_not_change_the_result(name):
    base, experts = tiny_states()
    params = properties(name).quick
    forward = fuse(name, base, experts, **params)
    backward = fuse(name, base, dict(reversed(list(experts.items()))), **params)
    assert_states_close(forward, backward)


@pytest.mark.parametrize("name", MERGING)
def test_dtype_and_device_are_preserved(name):
    base, experts = tiny_states(torch.bfloat16)
    out = fuse(name, base, experts, **properties(name).quick)
    assert out.keys() == base.keys()
    for k, v in out.items():
        assert v.dtype == base[k].dtype and v.device == base[k].device and v.shape == base[k].shape, k
        assert torch.isfinite(v.float()).all(), k
    assert torch.equal(out["ids"], base["ids"])


# ----------------------------------------------------------------------------- method math

def test_weighted_average_by_hand_and_keyed_by_task():
    base, experts = tiny_states()
    out = fuse("weighted_average", base, experts, weights={"alpha": 1.0, "beta": 3.0, "gamma": 0.0})
    expected = 0.25 * experts["alpha"]["fc1.weight"] + 0.75 * experts["beta"]["fc1.weight"]
    assert torch.allclose(out["fc1.weight"], expected, atol=1e-6)
    raw = fuse("weighted_average", base, experts, weights={"alpha": 1.0, "beta": 3.0, "gamma": 0.0},
               normalize=False)
    assert torch.allclose(raw["fc1.weight"], 4 * expected, atol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        fuse("weighted_average", base, experts, weights={"alpha": 1.0, "beta": 3.0})


def test_ensembles_keep_every_expert_with_weights_or_max():
    base, experts = tiny_states()
    w = fuse("weighted_ensemble", base, experts, weights={"alpha": 2.0, "beta": 1.0, "gamma": 1.0})
    assert isinstance(w, Ensemble) and len(w.members) == 3 and w.weights == [0.5, 0.25, 0.25]
    m = fuse("max_model_predictor", base, experts)
    assert isinstance(m, Ensemble) and m.reduce == "max" and len(m.members) == 3


def test_regmean_solves_the_least_squares_merge_of_each_linear_layer():
    """With alpha=1 the merged layer minimises sum_t ||X_t W^T - X_t W_t^T||^2 (the paper's objective)."""
    base, experts = tiny_states()
    out = fuse("regmean", base, experts, num_regmean_examples=N_EXAMPLES, reduce_non_diagonal_ratio=1.0)
    xs = [tiny_data(t, "train")[0] for t in TASKS]
    lhs = sum(x.T @ x / len(x) for x in xs)
    rhs = sum(x.T @ x / len(x) @ experts[t]["fc1.weight"].T for x, t in zip(xs, TASKS))
    assert torch.allclose(out["fc1.weight"], torch.linalg.solve(lhs, rhs).T, atol=1e-5)
    mean_bias = torch.stack([experts[t]["fc1.bias"] for t in TASKS]).mean(0)
    assert torch.allclose(out["fc1.bias"], mean_bias, atol=1e-6)


def test_exact_fisher_matches_a_per_example_loop_by_hand():
    from methods.fisher_merging import exact_fisher
    base, experts = tiny_states()
    model = tiny_build(experts["alpha"])
    x = tiny_data("alpha", "train")[0][:3]
    fisher, n = exact_fisher(model, lambda m, xb: tiny_logits(m, "alpha", xb), [(x, None)])
    expected = torch.zeros_like(model.fc2.weight)
    for xi in x:
        logp = torch.log_softmax(tiny_logits(model, "alpha", xi[None]), -1)[0]
        for y in range(CLASSES):
            g, = torch.autograd.grad(logp[y], model.fc2.weight, retain_graph=True)
            expected += logp[y].exp().detach() * g ** 2
    assert n == 3 and torch.allclose(fisher["fc2.weight"], expected, atol=1e-7)


def test_adamerging_lowers_the_entropy_on_test_inputs():
    from methods._adamerging import entropy
    base, experts = tiny_states()

    @torch.no_grad()
    def mean_entropy(state):
        model = tiny_build(state)
        return sum(float(entropy(tiny_logits(model, t, tiny_data(t, "test")[0]))) for t in TASKS)

    start = fuse("adamerging_layerwise", base, experts, max_steps=0)
    trained = fuse("adamerging_layerwise", base, experts, max_steps=30, batch_size=N_EXAMPLES, lr=0.05)
    assert mean_entropy(trained) < mean_entropy(start) - 1e-3


# Stochastic mixing methods need a transformer's blocks; tests/test_methods_b_mixing.py seeds them.
@pytest.mark.parametrize("name", sorted(n for n, i in registry.discover().items() if i.stochastic and i.category != "mixing"))
def test_stochastic_methods_same_seed_same_result(name):
    base, experts = tiny_states()
    params = properties(name).quick if name in MERGING else {}
    a = fuse(name, base, experts, seed=3, **params)
    b = fuse(name, base, experts, seed=3, **params)
    c = fuse(name, base, experts, seed=4, **params)
    assert_states_close(a, b, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a), "a different seed should shuffle the data differently"


# ----------------------------------------------------------------------------- data access

def test_undeclared_split_is_refused():
    base, experts = tiny_states()
    for access, wrong in [("none", "train"), ("labeled_train", "test"), ("unlabeled_test", "validation"),
                          ("unlabeled_train", "test")]:
        with pytest.raises(DataAccessError):
            next(tiny_context(base, experts, access).batches("alpha", wrong))


@pytest.mark.parametrize("access,split", [("unlabeled_test", "test"), ("unlabeled_train", "train")])
def test_unlabeled_access_never_hands_out_labels(access, split):
    base, experts = tiny_states()
    batches = list(tiny_context(base, experts, access).batches("alpha", split, batch_size=7))
    assert sum(len(x) for x, _ in batches) == N_EXAMPLES
    assert all(y is None for _, y in batches)


def test_declared_sample_count_caps_and_refuses_more():
    base, experts = tiny_states()
    ctx = tiny_context(base, experts, "labeled_train", samples_per_task=10)
    inputs, labels = tiny_data("alpha", "train")
    got = list(ctx.batches("alpha", "train", batch_size=4))
    assert torch.equal(torch.cat([x for x, _ in got]), inputs[:10])
    assert torch.equal(torch.cat([y for _, y in got]), labels[:10])
    shuffled = torch.cat([x for x, _ in ctx.batches("alpha", "train", generator=torch.Generator().manual_seed(0))])
    assert not torch.equal(shuffled, inputs[:10])
    assert sorted(shuffled[:, 0].tolist()) == sorted(inputs[:10, 0].tolist())
    with pytest.raises(DataAccessError, match="declared 10"):
        next(ctx.batches("alpha", "train", limit=11))


def test_methods_read_only_the_samples_they_declare():
    """Fisher with 8 examples gives the same merge as when the split holds only those 8."""
    base, experts = tiny_states()
    first8 = lambda task, split: tuple(t[:8] for t in tiny_data(task, split))
    for name, key in [("fisher_merging", "num_fisher_examples"), ("regmean", "num_regmean_examples")]:
        full = fuse(name, base, experts, **{key: 8})
        only8 = fuse(name, base, experts, data_fn=first8, **{key: 8})
        assert_states_close(full, only8, atol=0)


def test_registry_records_the_data_a_method_used():
    infos = registry.discover()
    fisher, ada, ta = infos["fisher_merging"], infos["adamerging_taskwise"], infos["task_arithmetic"]
    assert fisher.data_used(fisher.validate_params({"num_fisher_examples": 64})) == "unlabeled_train:64/task"
    assert ada.data_used(ada.validate_params({})) == "unlabeled_test:all/task" and ada.trains and ada.stochastic
    assert ta.data_used(ta.validate_params({})) == "none"


def test_sample_field_must_exist_and_needs_data_access():
    class P(Params):
        n: int = 4

    with pytest.raises(ValueError, match="not a field"):
        registry.method("bogus_a", params=P, category="merging", data="labeled_train", samples="m")
    with pytest.raises(ValueError, match="no data access"):
        registry.method("bogus_b", params=P, category="merging", samples="n")


def test_a_merging_method_without_property_cases_fails_a_test_naming_the_fix(monkeypatch):
    """Collection never breaks on an undeclared method: its declaration test fails and says what to add."""
    info = registry.get("task_arithmetic")
    monkeypatch.setitem(registry._REGISTRY, "undeclared_merge",
                        dataclasses.replace(info, name="undeclared_merge", properties=None))
    assert "undeclared_merge" in with_case("scaling_zero", [*MERGING, "undeclared_merge"])  # they run, and fail
    with pytest.raises(pytest.fail.Exception, match=r"declares no property-test cases: add properties=Properties"):
        properties("undeclared_merge")
