"""Every real model family, end to end, through the code path of the real hub ids.

Each test writes tiny random-initialised models and tiny datasets in the formats the hub
holds (save_pretrained + safetensors, datasets save_to_disk, peft LoRA adapters), a suite
YAML pointing at them, then runs `submit` (task arithmetic) and checks the stored rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A private suites dir, cache and DB for one test."""
    for name in ("suites", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("FBH_SUITES_DIR", str(tmp_path / "suites"))
    monkeypatch.setenv("FBH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBH_DB", str(tmp_path / "results.duckdb"))
    return tmp_path


def write_suite(root, spec: dict) -> None:
    (root / "suites" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def submit(root, *suites):
    from harness.runner import submit as run_submit
    sub = root / "ta.yaml"
    sub.write_text(yaml.safe_dump({"name": "ta", "method": "task_arithmetic", "params": {"scaling_factor": 0.3}}))
    return run_submit(sub, suites=list(suites), db=root / "results.duckdb", device="cpu", progress=lambda m: None)


def stored(root, label: str, setting: str = "all") -> list[dict]:
    store = Store(root / "results.duckdb")
    run = store.query("SELECT * FROM runs WHERE label = ? AND setting = ?", [label, setting])
    assert run and run[0]["status"] == "ok", run
    return store.query("SELECT * FROM results WHERE run_id = ? ORDER BY task, condition", [run[0]["run_id"]])


def byte_vocab(*specials: str) -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every word is spelt out, but distinct
    words stay distinct, which is all a random model needs."""
    from tokenizers import pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + list(specials))}


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tuned' copy: the same architecture, weights moved by small random deltas."""
    import copy
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def save_text_dataset(path, rows: dict[str, list], split: str = "validation") -> None:
    import datasets
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))


# ----------------------------------------------------------------------------- CLIP

CLIP_TASKS = {"sun397": ["abbey", "airport", "bakery"], "eurosat": ["forest", "river"]}


def tiny_clip(root):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel)
    vocab = byte_vocab("<|startoftext|>", "<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    base = root / "openai-clip-tiny"
    clip.save_pretrained(base)  # the full CLIPModel, like openai/clip-vit-base-patch32
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(base)
    vision = CLIPVisionModel.from_pretrained(base)
    for i, task in enumerate(CLIP_TASKS):  # vision towers only, like tanganke/clip-vit-base-patch32_<task>
        perturbed(vision, i).save_pretrained(root / "experts" / task)
    import datasets
    rng = np.random.default_rng(0)
    for task, classes in CLIP_TASKS.items():
        def split(n):
            images = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]
            return datasets.Dataset.from_dict({"image": images, "label": [i % len(classes) for i in range(n)]},
                                              features=datasets.Features({"image": datasets.Image(),
                                                                          "label": datasets.ClassLabel(names=classes)}))
        datasets.DatasetDict({"train": split(8), "test": split(12)}).save_to_disk(str(root / "data" / task))
    return clip


def test_clip_zero_shot_heads_and_submit(env):
    clip = tiny_clip(env)
    templates = ["a photo of a {c}.", "a satellite photo of the {c}."]
    write_suite(env, {
        "name": "clip-tiny", "family": {
            "kind": "clip_vision", "base": "../openai-clip-tiny", "heads": "zero_shot",
            "experts": {t: f"../experts/{t}" for t in CLIP_TASKS}},
        "tasks": [{"name": t, "dataset": f"../data/{t}", "validation_split": None, "classes": c,
                   "templates": templates} for t, c in CLIP_TASKS.items()],
        "corruptions": [{"name": "jpeg", "severity": 2, "tasks": ["eurosat"]}],
        "references": {"computed": ["pretrained", "stl"],
                       "published": [{"label": "Task Arithmetic (paper)", "method": "task_arithmetic",
                                      "source": "FusionBench Table 3", "tolerance": 1.0,
                                      "values": {"sun397": 57.1, "eurosat": 76.7}}]}})
    report = submit(env, "clip-tiny")
    assert [o.status for o in report.outcomes] == ["ok", "ok", "ok"], report.outcomes

    # The heads are the averaged, normalised text embeddings of the templates, per class.
    from harness.families.common import cache_dir
    from safetensors import safe_open
    (heads_file,) = (cache_dir() / "heads").glob("zero-shot-*.safetensors")
    with safe_open(str(heads_file), "pt") as f:
        assert float(f.metadata()["logit_scale"]) == pytest.approx(float(clip.logit_scale.detach().exp()))
        head = f.get_tensor("sun397")
        assert torch.equal(f.get_tensor("visual_projection"), clip.visual_projection.weight.detach())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(env / "openai-clip-tiny")
    with torch.no_grad():
        text = clip.get_text_features(**tok([t.replace("{c}", "bakery") for t in templates], padding=True,
                                            return_tensors="pt")).pooler_output
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).mean(0), dim=-1)
    assert head.shape == (3, 16) and torch.allclose(head[2], expected, atol=1e-5)

    rows = stored(env, "ta")
    assert {(r["task"], r["condition"]) for r in rows} == {("sun397", "clean"), ("eurosat", "clean"),
                                                           ("eurosat", "jpeg")}
    assert all(r["n"] == 12 and 0 <= r["value"] <= 100 and r["metric"] == "accuracy" for r in rows)
    assert {r["condition"]: r["severity"] for r in rows if r["task"] == "eurosat"} == {"clean": None, "jpeg": 2}
    published = Store(env / "results.duckdb").query("SELECT * FROM runs WHERE kind = 'published'")
    assert published[0]["source"] == "FusionBench Table 3" and published[0]["tolerance"] == 1.0
