"""Differential tests of the issue-21 merges that fusion-bench 0.2.33 implements (WUDI, ExPO):
fbh's output equals fusion-bench's on the same tiny models (<= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from harness import registry
from harness.api import FusionContext
from test_differential_fusion_bench import assert_close, fb_module, float_state, modules
from test_methods_a import fuse, tiny_states


@pytest.fixture(scope="module")
def states():
    return tiny_states()


@pytest.mark.parametrize("iter_num", [0, 25])
def test_wudi(states, iter_num):
    from fusion_bench.method.wudi.wudi import wudi_merging
    base, experts = states
    base_f = float_state(base)
    task_vectors = [{k: float_state(e)[k] - v for k, v in base_f.items()} for e in experts.values()]
    merged = wudi_merging(task_vectors, accelerator="cpu", iter_num=iter_num)
    theirs = {k: v + merged[k].detach() for k, v in base_f.items()}
    ours = fuse("wudi", base, experts, iter_num=iter_num)
    assert_close(ours, theirs)
    if iter_num:  # the optimisation moved the linear layers away from the plain sum it starts from
        start = fuse("wudi", base, experts, iter_num=0)
        assert not torch.allclose(ours["fc1.weight"], start["fc1.weight"], atol=1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("n_experts", [1, 3])
def test_expo(states, alpha, n_experts):
    from fusion_bench.method.linear.expo import ExPOAlgorithm
    base, experts = states
    chosen = dict(list(experts.items())[:n_experts])
    theirs = ExPOAlgorithm(extrapolation_factor=alpha).run({"_pretrained_": fb_module(base), **modules(chosen)})
    assert_close(fuse("expo", base, chosen, extrapolation_factor=alpha), theirs)


@pytest.mark.parametrize("scaling,alpha", [(0.3, 0.1), (0.7, 1.0)])
def test_svc_on_task_arithmetic(states, scaling, alpha):
    from fusion_bench.method.singular_value_calibration.task_arithmetic import SingularValueCalibrationArithmeticTask
    base, experts = states
    algorithm = SingularValueCalibrationArithmeticTask(scaling_factor=scaling, alpha=alpha, accelerator="cpu")
    theirs = algorithm.run({"_pretrained_": fb_module(base), **modules(experts)})
    ours = fuse("svc", base, experts, scaling_factor=scaling, alpha=alpha)
    assert_close(ours, theirs)
    plain = fuse("task_arithmetic", base, experts, scaling_factor=scaling)
    assert not torch.allclose(ours["fc1.weight"], plain["fc1.weight"], atol=1e-4)  # the calibration did something
    assert torch.allclose(ours["fc1.bias"], plain["fc1.bias"], atol=1e-6)  # and only to matrices


class EncoderNet(torch.nn.Module):
    """Entries named as fusion-bench's DOGE TA selects them on CLIP ('encoder' weights), and others it leaves."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 8))
        self.encoder_layer_norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)


def encoder_states():
    torch.manual_seed(0)
    base = EncoderNet().state_dict()
    experts = {}
    for i, t in enumerate(["alpha", "beta", "gamma"]):
        g = torch.Generator().manual_seed(200 + i)
        experts[t] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, experts


def encoder_module(state):
    model = EncoderNet()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("lamda,K", [(0.07, 30.0), (0.3, 60.0)])
def test_doge_ta(lamda, K):
    from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm
    base, experts = encoder_states()
    algorithm = DOGE_TA_Algorithm(subspace=2, K=K, lamda=lamda)
    theirs = algorithm.run({"_pretrained_": encoder_module(base), **{t: encoder_module(e) for t, e in experts.items()}})
    info = registry.get("doge_ta")
    ctx = FusionContext.from_state_dicts(base, experts)
    ours = info.fn(ctx, info.validate_params({"lamda": lamda, "K": K, "subspace": 2}))
    assert_close(ours, theirs)
    assert torch.equal(ours["head.weight"], base["head.weight"])  # outside the encoder: the base's
    assert not torch.equal(ours["encoder.0.weight"], base["encoder.0.weight"])
