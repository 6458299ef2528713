"""By-hand cases for the issue-21 merges without a fusion-bench or mergekit twin (PCB-merging,
LiNeS, CART): each follows its paper's equations as its authors' code computes them."""

from __future__ import annotations

import torch

from harness import registry
from harness.api import FusionContext


def fuse(name: str, base: dict, experts: list[dict], **params) -> dict:
    info = registry.get(name)
    return info.fn(FusionContext.from_state_dicts(base, experts), info.validate_params(params))


def offsets(base: dict, deltas: list[dict]) -> list[dict]:
    return [{k: base[k] + d[k] for k in base} for d in deltas]


# ----------------------------------------------------------------------------- PCB-merging

def authors_pcb_merge(flat_task_checks, pcb_ratio=0.1):
    """PCB_merge, normalize, clamp and act from pcb-merging.py of github.com/duguodong7/pcb-merging
    (MIT licence, (c) 2024 duguodong), copied unchanged but for layout: the reference fbh's
    methods/pcb_merging.py is checked against."""
    def normalize(x, dim=0):
        min_values, _ = torch.min(x, dim=dim, keepdim=True)
        max_values, _ = torch.max(x, dim=dim, keepdim=True)
        return (x - min_values) / (max_values - min_values)

    def clamp(x, min_ratio=0, max_ratio=0):
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.0001, max_ratio=0.0001)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_pcb = normalize(all_checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb = all_checks * torch.sum(all_checks, dim=0)
    cross_pcb_act = torch.tanh(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act
    scale = normalize(clamp(task_pcb, 1 - pcb_ratio, 0), dim=1)
    return torch.sum(clamped_all_checks * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)


def pcb_states():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(40, 30, generator=g), "a.bias": torch.randn(40, generator=g),
            "ids": torch.arange(4)}
    deltas = [{k: (0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros_like(v))
               for k, v in base.items()} for _ in range(3)]
    return base, deltas


def test_pcb_equals_the_authors_key_steps_on_the_flattened_task_vectors():
    base, deltas = pcb_states()
    for ratio, lam in [(0.1, 1.0), (0.3, 1.7)]:
        flat = torch.stack([torch.cat([d["a.weight"].reshape(-1), d["a.bias"]]) for d in deltas])
        merged = authors_pcb_merge(flat, ratio)
        out = fuse("pcb_merging", base, offsets(base, deltas), pcb_ratio=ratio, scaling_factor=lam)
        assert torch.allclose(out["a.weight"], base["a.weight"] + lam * merged[:1200].view(40, 30), atol=1e-6)
        assert torch.allclose(out["a.bias"], base["a.bias"] + lam * merged[1200:], atol=1e-6)
        assert torch.equal(out["ids"], base["ids"])


def test_pcb_weighs_only_each_tasks_top_fraction():
    """An entry no task ranks in its top pcb_ratio has weight 0 everywhere: the merge leaves it at the base."""
    from methods.pcb_merging import pcb_merge
    g = torch.Generator().manual_seed(1)
    tvs = torch.randn(2, 1000, generator=g)
    merged = pcb_merge(tvs, 0.1)
    assert 100 <= int((merged != 0).sum()) <= 200  # each task's top 10%, overlapping or not


# ----------------------------------------------------------------------------- LiNeS

def test_lines_scales_each_block_linearly_in_depth_and_the_rest_by_alpha():
    keys = ["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "layers.3.w", "head.weight"]
    base = {k: torch.zeros(3) for k in keys}
    experts = [{k: torch.full((3,), 1.0) for k in keys}, {k: torch.full((3,), 2.0) for k in keys}]
    out = fuse("lines", base, experts, beta=0.6)  # alpha defaults to 1/T = 0.5; summed task vector = 3
    expected = {"embed.weight": 0.5, "layers.0.w": 0.5, "layers.1.w": 0.7, "layers.2.w": 0.9,
                "layers.3.w": 1.1, "head.weight": 0.5}
    for k, lam in expected.items():
        assert torch.allclose(out[k], torch.full((3,), 3 * lam)), k


def test_lines_blocks_come_from_the_first_integer_component_of_a_name():
    from methods.lines import block_index
    assert block_index("vision_model.encoder.layers.11.mlp.fc1.weight") == 11
    assert block_index("encoder.block.3.layer.0.SelfAttention.q.weight") == 3  # T5: the block, not the sublayer
    assert block_index("vision_model.post_layernorm.weight") is None
    assert block_index("fc1.weight") is None


# ----------------------------------------------------------------------------- CART

def test_cart_at_full_rank_is_the_weight_average():
    """Centered task vectors sum to zero, so without truncation CART returns the average whatever the prior."""
    g = torch.Generator().manual_seed(2)
    base = {"blocks.0.attn.weight": torch.randn(5, 4, generator=g), "blocks.0.mlp.bias": torch.randn(5, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = fuse("cart", base, experts, rank_ratio=1.0, prior=2.0)
    for k in base:
        assert torch.allclose(out[k], torch.stack([e[k] for e in experts]).mean(0), atol=1e-5), k


def test_cart_keeps_each_centered_matrix_top_singular_directions():
    """Centered matrices A, B, -(A+B) with known SVDs: at rank 1 they keep 3 e1f1', 2 e3f3' and -3 e1f1',
    so the merge is the average plus prior * 2 e3f3'. Non-attention entries are averaged (sum of centered = 0)."""
    e, f = torch.eye(6)[:, :4], torch.eye(4)
    outer = lambda i, j: torch.outer(e[:, i], f[:, j])
    a = 3 * outer(0, 0) + 1 * outer(1, 1)
    b = 2 * outer(2, 2) + 0.5 * outer(3, 3)
    g = torch.Generator().manual_seed(3)
    base = {"layer.attn.weight": torch.randn(6, 4, generator=g), "fc.weight": torch.randn(6, 4, generator=g)}
    average = {k: v + 0.1 for k, v in base.items()}
    experts = [{"layer.attn.weight": average["layer.attn.weight"] + c, "fc.weight": average["fc.weight"] + c}
               for c in (a, b, -(a + b))]
    out = fuse("cart", base, experts, rank_ratio=0.25, prior=1.5)  # int(0.25 * 4) = rank 1
    assert torch.allclose(out["layer.attn.weight"], average["layer.attn.weight"] + 1.5 * 2 * outer(2, 2), atol=1e-5)
    assert torch.allclose(out["fc.weight"], average["fc.weight"], atol=1e-5)


# ----------------------------------------------------------------------------- Consensus merging

def test_consensus_keeps_the_weights_enough_tasks_use():
    """Three tasks on four entries; a task's TALL mask keeps |tau_t| > 0.4 |tau_MTL - tau_t|:
    entry 0 (1, 1, 1): 1 > 0.8 for every task, three masks; entry 1 (2, 0, 0): only task 0's
    ('selfish'); entry 2 (0.1, 1, 1): tasks 1 and 2 (1 > 0.44), not task 0 (0.1 > 0.8 fails);
    entry 3 (0.5, 0.5, 3): only task 2 (3 > 0.4; 0.5 > 1.4 fails)."""
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor(d)} for d in ([1.0, 2.0, 0.1, 0.5], [1.0, 0.0, 1.0, 0.5], [1.0, 0.0, 1.0, 3.0])]
    total = torch.tensor([3.0, 2.0, 2.1, 4.0])
    for k, kept in [(3, [1.0, 0.0, 0.0, 0.0]), (2, [1.0, 0.0, 1.0, 0.0]), (1, [1.0, 1.0, 1.0, 1.0])]:
        out = fuse("consensus_merging", base, experts, tall_mask_lambda=0.4, prune_threshold_k=k, scaling_factor=0.5)
        assert torch.allclose(out["w"], 0.5 * total * torch.tensor(kept)), k
