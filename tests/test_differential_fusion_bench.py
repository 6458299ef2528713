"""Differential tests: fbh's methods equal fusion-bench 0.2.33's on the same tiny models (<= 1e-5).

fusion-bench is a test-only dependency (pyproject's `test` extra). Its algorithms run here
on tiny nn.Modules; where it needs a trainer or data loader, a minimal stand-in hands it the
same examples fbh reads. Where fusion-bench's convention differs from the paper's, fbh has a
named option and both are tested (TIES disjoint merge; the Fisher estimator).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from test_methods_a import TASKS, TinyNet, fuse, tiny_build, tiny_context, tiny_data, tiny_logits, tiny_states

TOL = 1e-5


def fb_module(state: dict) -> nn.Module:
    """A TinyNet without its integer buffer: fusion-bench's arithmetic casts every entry to float."""
    model = tiny_build(state)
    del model._buffers["ids"]
    return model


def modules(states: dict[str, dict]) -> dict[str, nn.Module]:
    return {name: fb_module(sd) for name, sd in states.items()}


def float_state(model_or_sd) -> dict[str, torch.Tensor]:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: v.detach() for k, v in sd.items() if v.is_floating_point()}


def assert_close(fbh_sd, ref_sd, tol=TOL):
    ref = float_state(ref_sd)
    assert ref and set(ref) <= set(fbh_sd)
    for k, v in ref.items():
        gap = float((fbh_sd[k].float() - v.float()).abs().max())
        assert gap <= tol, f"{k}: fbh and fusion-bench differ by {gap:.3g}"


@pytest.fixture(scope="module")
def states():
    return tiny_states()


def test_simple_average(states):
    from fusion_bench.method.simple_average import simple_average as fb_simple_average
    base, experts = states
    assert_close(fuse("simple_average", base, experts), fb_simple_average([float_state(e) for e in experts.values()]))


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average(states, normalize):
    from fusion_bench.method import WeightedAverageAlgorithm
    base, experts = states
    weights = [0.2, 0.5, 0.9]
    ref = WeightedAverageAlgorithm(normalize=normalize, weights=weights, verbose=False).run(modules(experts))
    ours = fuse("weighted_average", base, experts, weights=dict(zip(TASKS, weights)), normalize=normalize)
    assert_close(ours, ref)


@pytest.mark.parametrize("scaling", [0.3, 0.7])
def test_task_arithmetic(states, scaling):
    from fusion_bench.method import TaskArithmeticAlgorithm
    base, experts = states
    ref = TaskArithmeticAlgorithm(scaling_factor=scaling).run({"_pretrained_": fb_module(base), **modules(experts)})
    assert_close(fuse("task_arithmetic", base, experts, scaling_factor=scaling), ref)


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("top_k", [0.2, 0.5])
def test_ties_merging_global_top_k(states, merge_func, top_k):
    """fusion-bench trims the whole flattened task vector (top_k_scope='global'); its default merge is a sum."""
    from fusion_bench.method import TiesMergingAlgorithm
    base, experts = states
    pool = {"_pretrained_": fb_module(base), **modules(experts)}
    ref = TiesMergingAlgorithm(scaling_factor=0.3, threshold=top_k, remove_keys=[],
                               merge_func=merge_func).run(pool)
    ours = fuse("ties_merging", base, experts, scaling_factor=0.3, top_k=top_k, disjoint_merge=merge_func,
                top_k_scope="global")
    assert_close(ours, ref)


# ----------------------------------------------------------------------------- data-driven merges

class HeadedModel(nn.Module):
    """A TinyNet with the task's fixed head. With wrap=True forward(**inputs) returns an object
    with .logits, as fusion-bench's MergeLM-style fisher_merging / regmean_merging expect."""

    def __init__(self, net: nn.Module, task: str, wrap: bool = True):
        super().__init__()
        self.net = net
        net._buffers.pop("ids", None)
        self.task = task
        self.wrap = wrap

    def forward(self, x):
        logits = tiny_logits(self.net, self.task, x)
        return SimpleNamespace(logits=logits) if self.wrap else logits


class StandInTrainer:
    """What fusion-bench's functions use of a HF Trainer: a train loader, its batch size, input prep."""

    def __init__(self, task: str, batch_size: int):
        self.task = task
        self._train_batch_size = batch_size

    def get_train_dataloader(self):
        inputs, _ = tiny_data(self.task, "train")
        return [{"x": inputs[i:i + self._train_batch_size]} for i in range(0, len(inputs), self._train_batch_size)]

    def _prepare_inputs(self, inputs):
        return inputs


def headed(experts):
    return [HeadedModel(tiny_build(experts[t]), t) for t in TASKS]


def unwrap(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in merged.items()}


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merging_batch_estimator(states, normalize):
    from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging as fb_fisher_merging
    base, experts = states
    n, bs = 32, 8
    ref = fb_fisher_merging(headed(experts), [StandInTrainer(t, bs) for t in TASKS], exclude_param_names_regex=[],
                            nums_fisher_examples=[n] * len(TASKS), normalize_fisher_weight=normalize,
                            minimal_fisher_weight=1e-6)
    ours = fuse("fisher_merging", base, experts, num_fisher_examples=n, batch_size=bs, fisher_estimator="batch",
                normalize_fisher_weight=normalize)
    assert_close(ours, unwrap(ref))


def test_fisher_merging_exact_estimator_merges_as_fusion_bench(states):
    """The paper's per-example Fisher, fed to fusion-bench's merge step, gives fbh's merge."""
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from methods.fisher_merging import FisherMergingParams, fisher_of
    base, experts = states
    params = FisherMergingParams(num_fisher_examples=8)
    ctx = tiny_context(base, experts, "unlabeled_train", samples_per_task=8)
    fishers = [fisher_of(ctx, t, params) for t in TASKS]
    names = [k for k, _ in TinyNet().named_parameters()]
    ref = merging_with_fisher_weights({k: [experts[t][k] for t in TASKS] for k in names}, fishers,
                                      torch.ones(len(TASKS)) / len(TASKS), True, 1e-6)
    assert_close(fuse("fisher_merging", base, experts, num_fisher_examples=8), ref)


@pytest.mark.parametrize("alpha", [0.95, 0.5])
def test_regmean(states, alpha):
    from fusion_bench.method.regmean.regmean import regmean_merging
    base, experts = states
    n, bs = 24, 8
    ref = regmean_merging(headed(experts), [StandInTrainer(t, bs) for t in TASKS], exclude_param_names_regex=[],
                          nums_regmean_examples=[n] * len(TASKS), reduce_non_diagonal_ratio=alpha)
    ours = fuse("regmean", base, experts, num_regmean_examples=n, batch_size=bs, reduce_non_diagonal_ratio=alpha)
    assert_close(ours, unwrap(ref))


# ----------------------------------------------------------------------------- ensembles

def ensemble_logits(fused, task, x):
    from harness.evaluate import as_predictor, predict
    family = SimpleNamespace(build=tiny_build, logits=tiny_logits)
    return predict(as_predictor(fused, family), family, task, x, batch_size=16)


@pytest.mark.parametrize("kind", ["simple", "weighted", "max"])
def test_ensembles(states, kind):
    from fusion_bench.models.wrappers.ensemble import EnsembleModule, MaxModelPredictor, WeightedEnsembleModule
    base, experts = states
    weights = [0.2, 0.5, 0.9]
    fused, ref_cls, kwargs = {
        "simple": (fuse("simple_ensemble", base, experts), EnsembleModule, {}),
        "weighted": (fuse("weighted_ensemble", base, experts, weights=dict(zip(TASKS, weights))),
                     WeightedEnsembleModule, {"weights": weights, "normalize": True}),
        "max": (fuse("max_model_predictor", base, experts), MaxModelPredictor, {}),
    }[kind]
    x = tiny_data("beta", "test")[0]
    ref = ref_cls([HeadedModel(tiny_build(experts[t]), "beta", wrap=False) for t in TASKS], **kwargs)(x)
    assert float((ensemble_logits(fused, "beta", x) - ref).abs().max()) <= TOL


# ----------------------------------------------------------------------------- AdaMerging

@pytest.mark.parametrize("layer_wise", [False, True])
def test_adamerging_matches_fusion_bench_merged_model_training(states, layer_wise):
    """fusion-bench's Task/LayerWiseMergedModel trained by its TTA loop (entropy loss, Adam, one
    batch per task per step) on the batches fbh reads gives fbh's merged weights."""
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel, get_task_wise_weights
    from methods._adamerging import endless_inputs
    base, experts = states
    steps, bs, lr, init = 4, 8, 0.05, 0.3
    name = "adamerging_layerwise" if layer_wise else "adamerging_taskwise"
    ours = fuse(name, base, experts, seed=5, max_steps=steps, batch_size=bs, lr=lr, init_values=init)

    finetuned = [fb_module(experts[t]) for t in TASKS]
    n_params = len(list(TinyNet().parameters()))
    if layer_wise:
        merged = LayerWiseMergedModel(get_layer_wise_weights(len(TASKS), n_params, init), fb_module(base),
                                      finetuned, clamp_weights=True, tie_weights=True, strict=False)
    else:
        merged = TaskWiseMergedModel(get_task_wise_weights(len(TASKS), init), fb_module(base), finetuned,
                                     clamp_weights=True, tie_weights=True, strict=False)
    ctx = tiny_context(base, experts, "unlabeled_test", seed=5)
    streams = {t: endless_inputs(ctx, t, bs) for t in TASKS}
    optimizer = torch.optim.Adam([merged.merge_weight], lr=lr)
    merged.merge_weights()
    for _ in range(steps):
        for t in TASKS:
            entropy_loss(tiny_logits(merged, t, next(streams[t]))).backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        merged.merge_weights()
    assert_close(ours, merged.merge_and_unload())
