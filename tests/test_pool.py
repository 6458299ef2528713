"""harness.pool: streaming state dicts read tensor by tensor from safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from harness.api import FusionContext
from harness.pool import LazyStateDict, read_header, safetensors_files


def sample_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(5, 3, generator=g).to(dtype),
        "a.bias": torch.randn(7, generator=g).to(dtype),
        "pos_ids": torch.arange(4).view(1, 4),
        "scalar": torch.tensor(2.5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lazy_state_dict_reads_every_entry_exactly(tmp_path, dtype):
    state = sample_state(dtype)
    save_file(state, str(tmp_path / "model.safetensors"))
    lazy = LazyStateDict(tmp_path / "model.safetensors")
    assert set(lazy) == set(state) and len(lazy) == len(state)
    for k, v in state.items():
        got = lazy[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got, v)
    assert lazy.nbytes() == sum(v.numel() * v.element_size() for v in state.values())


def test_reads_are_fresh_and_writable(tmp_path):
    state = sample_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    lazy = LazyStateDict(tmp_path / "model.safetensors")
    first = lazy["b.weight"]
    first.mul_(0)  # mutating one read must not leak into the next, nor into the file
    assert torch.equal(lazy["b.weight"], state["b.weight"])


def test_key_order_dtype_cast_and_missing_keys(tmp_path):
    state = sample_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    order = ["scalar", "pos_ids", "a.bias", "b.weight", "empty"]
    lazy = LazyStateDict(tmp_path / "model.safetensors", keys=order, dtypes={"a.bias": torch.bfloat16})
    assert list(lazy) == order
    assert lazy["a.bias"].dtype == torch.bfloat16
    assert torch.equal(lazy["a.bias"], state["a.bias"].to(torch.bfloat16))
    with pytest.raises(KeyError):
        LazyStateDict(tmp_path / "model.safetensors", keys=["nope"])
    with pytest.raises(KeyError):
        lazy["nope"]
    assert isinstance(lazy.copy(), dict) and lazy.copy().keys() == state.keys()


def test_sharded_checkpoint(tmp_path):
    state = sample_state()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = safetensors_files(tmp_path)
    assert [f.name for f in files] == sorted(shards)
    lazy = LazyStateDict(files)
    assert all(torch.equal(lazy[k], v) for k, v in state.items())
    assert safetensors_files(tmp_path / "missing") is None


def test_header_offsets_cover_the_data(tmp_path):
    state = sample_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    entries = read_header(tmp_path / "model.safetensors")
    size = (tmp_path / "model.safetensors").stat().st_size
    assert max(e.start + e.nbytes for e in entries.values()) == size


def test_merges_on_lazy_checkpoints_equal_eager_ones(tmp_path):
    """The registered merging methods give the same result on streaming and in-memory experts."""
    from harness import registry
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 4, generator=g).to(torch.bfloat16), "b": torch.randn(4, generator=g),
            "ids": torch.arange(3)}
    experts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
                for k, v in base.items()} for _ in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"e{i}.safetensors"))
    lazy_base = LazyStateDict(tmp_path / "base.safetensors", keys=list(base))
    lazy_experts = [LazyStateDict(tmp_path / f"e{i}.safetensors", keys=list(base)) for i in range(3)]
    for name, params in [("task_arithmetic", {}), ("simple_average", {}),
                         ("ties_merging", {"top_k_scope": "global"}), ("ties_merging", {"top_k_scope": "per_tensor"})]:
        info = registry.get(name)
        p = info.validate_params(params)
        eager = info.fn(FusionContext.from_state_dicts(base, experts), p)
        lazy = info.fn(FusionContext.from_state_dicts(lazy_base, lazy_experts), p)
        assert eager.keys() == lazy.keys()
        for k in eager:
            assert eager[k].dtype == lazy[k].dtype == base[k].dtype, (name, k)
            assert torch.equal(eager[k], lazy[k]), (name, k)


@pytest.mark.parametrize("chunk", [1 << 18, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_helpers_give_out_of_place_bits_and_leave_inputs_alone(tmp_path, dtype, chunk, monkeypatch):
    """delta_sum / mean read streaming float32 experts piece by piece (chunk 7: 74 pieces, the
    last one short) or work on copies (eager, bf16): the same bits as the textbook
    expressions, and an eager expert is never modified."""
    from harness import tensors
    from harness.tensors import delta_sum, mean
    monkeypatch.setattr(tensors, "CHUNK", chunk)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 8, generator=g).to(dtype)
    experts = [{"w": (base.float() + 0.05 * torch.randn(64, 8, generator=g)).to(dtype)} for _ in range(4)]
    before = [e["w"].clone() for e in experts]
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"e{i}.safetensors"))
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    lazy = [LazyStateDict(tmp_path / f"e{i}.safetensors") for i in range(4)]
    lazy_base = LazyStateDict(tmp_path / "base.safetensors")
    b = base.float()
    expected_sum = (((experts[0]["w"].float() - b) + (experts[1]["w"].float() - b)) + (experts[2]["w"].float() - b)) \
        + (experts[3]["w"].float() - b)
    expected_mean = (((experts[0]["w"].float() + experts[1]["w"].float()) + experts[2]["w"].float())
                     + experts[3]["w"].float()) / 4
    for states, base_state in ((experts, {"w": base}), (lazy, {"w": base}), (lazy, lazy_base)):
        assert torch.equal(delta_sum(states, "w", base_state), expected_sum)
        assert torch.equal(mean(states, "w"), expected_mean)
        task_arithmetic = delta_sum(states, "w", base_state, then=lambda total, ref: total.mul_(0.3).add_(ref))
        assert torch.equal(task_arithmetic, expected_sum * 0.3 + b)
    assert torch.equal(delta_sum([], "w", lazy_base), torch.zeros(64, 8))
    assert all(torch.equal(e["w"], x) for e, x in zip(experts, before))
    assert lazy[0].reads_float32_slices("w") == (dtype == torch.float32)


def test_zoo_checkpoints_stream_and_match_transformers(fbh_env):
    """clip_vision loads zoo experts as LazyStateDicts equal to what from_pretrained gives,
    and a merged lazy result builds and predicts."""
    import harness.runner as runner
    from harness.evaluate import as_predictor, predict
    handle = runner.open_suite("tiny-small", "cpu", progress=lambda _: None)
    family = handle.family
    task = handle.spec.task_names[0]
    lazy = family.expert_state(task)
    assert isinstance(lazy, LazyStateDict)
    model = family.load_model(family.suite.family.experts[task], "x")
    eager = model.state_dict()
    assert list(lazy) == list(eager)
    assert all(torch.equal(lazy[k], v) for k, v in eager.items())
    assert isinstance(family.base_state(), LazyStateDict)
    inputs, _ = family.eval_data(task, "test")
    pred = as_predictor(lazy, family)  # a method may return a checkpoint as it is
    assert torch.allclose(predict(pred, family, task, inputs[:8], 4), family.logits(model, task, inputs[:8]),
                          atol=1e-5)


def test_read_slice_reads_pieces_and_refuses_what_it_cannot_serve(tmp_path):
    import pickle
    state = sample_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    lazy = LazyStateDict(tmp_path / "m.safetensors")
    flat = state["b.weight"].reshape(-1)
    assert torch.equal(lazy.read_slice("b.weight", 4, torch.empty(6)), flat[4:10])
    with pytest.raises(IndexError, match="outside 'b.weight'"):
        lazy.read_slice("b.weight", 10, torch.empty(6))
    with pytest.raises(ValueError, match="float32 entries"):
        lazy.read_slice("pos_ids", 0, torch.empty(2))
    clone = pickle.loads(pickle.dumps(lazy))  # open descriptors stay behind; the copy opens its own
    assert torch.equal(clone["a.bias"], state["a.bias"])


def test_merge_threads_keep_order_nest_and_survive_fork():
    """parallel_map returns results in the order of its items; a forked child (the zoo's
    fine-tuning workers, data-loader workers) has none of the parent's threads and makes its own."""
    import os
    from harness.tensors import parallel_map
    assert parallel_map(lambda x: x * x, list(range(50))) == [x * x for x in range(50)]
    # work on the pool's threads that maps again (TIES per tensor on large entries) runs inline
    assert parallel_map(lambda x: parallel_map(lambda y: x * y, [1, 2, 3]), list(range(8))) == \
        [[x, 2 * x, 3 * x] for x in range(8)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns into pytest, whatever happens
        try:
            os.write(write, repr(parallel_map(lambda x: x + 1, [1, 2, 3])).encode())
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 100) == b"[2, 3, 4]"
    os.waitpid(pid, 0)


def test_average_and_task_arithmetic_read_no_whole_base_tensor_from_streaming_checkpoints(tmp_path, monkeypatch):
    """map_keys takes a streaming base's dtypes from its header: simple averaging never reads the
    base, task arithmetic reads it piece by piece; only non-floating entries are read whole."""
    from harness.api import FusionContext
    from harness import registry
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 7, generator=g), "ids": torch.arange(5)}
    for i in range(3):
        save_file({"w": base["w"] + torch.randn(300, 7, generator=g), "ids": base["ids"]}, str(tmp_path / f"e{i}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    whole_reads = []
    read = LazyStateDict.__getitem__
    monkeypatch.setattr(LazyStateDict, "__getitem__", lambda self, k: whole_reads.append(k) or read(self, k))
    registry.discover()
    for name, params in (("simple_average", {}), ("task_arithmetic", {"scaling_factor": 0.3})):
        info = registry.get(name)
        ctx = FusionContext(tasks=["a", "b", "c"], load_base=lambda: LazyStateDict(tmp_path / "base.safetensors"),
                            load_expert=lambda t: LazyStateDict(tmp_path / f"e{'abc'.index(t)}.safetensors"),
                            build_module=None)
        whole_reads.clear()
        merged = info.fn(ctx, info.validate_params(params))
        assert whole_reads == ["ids"], name
        assert torch.equal(merged["ids"], base["ids"])
        eager = info.fn(FusionContext(tasks=["a", "b", "c"], load_base=lambda: dict(base),
                                      load_expert=lambda t: LazyStateDict(tmp_path / f"e{'abc'.index(t)}.safetensors").copy(),
                                      build_module=None), info.validate_params(params))
        assert torch.equal(merged["w"], eager["w"]), name
