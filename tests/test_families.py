"""Every real model family, end to end, through the code path of the real hub ids.

Each test writes tiny random-initialised models and tiny datasets in the formats the hub
holds (save_pretrained + safetensors, datasets save_to_disk, peft LoRA adapters), a suite
YAML pointing at them, then runs `submit` (task arithmetic) and checks the stored rows.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml

from conftest import save_random_image_datasets
from harness.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]




@pytest.fixture()
def env(private_env):
    return private_env


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
    save_random_image_datasets(root, CLIP_TASKS)
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


# ----------------------------------------------------------------------------- GPT-2

GLUE_ROWS = {
    "cola": {"sentence": ["the cat sat", "sat the cat", "a dog ran", "ran dog a", "the red cat", "cat red the"],
             "label": [1, 0, 1, 0, 1, 0], "idx": list(range(6))},
    "mrpc": {"sentence1": ["a cat", "a dog", "the sun", "red sky"], "sentence2": ["the cat", "one cat", "sun", "a sky"],
             "label": [1, 0, 1, 0], "idx": list(range(4))},
}


def test_gpt2_classification_keeps_task_heads(env):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Tokenizer
    vocab = byte_vocab("<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)  # like `gpt2`: a language model checkpoint, no classification head
    base.save_pretrained(env / "gpt2")
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(env / "gpt2")
    for i, task in enumerate(GLUE_ROWS):  # like tanganke/gpt2_<task>: body + its own `score` head
        clf = GPT2ForSequenceClassification.from_pretrained(env / "gpt2", num_labels=2, pad_token_id=config.eos_token_id)
        perturbed(clf, i).save_pretrained(env / "experts" / task)
        save_text_dataset(env / "data" / task, GLUE_ROWS[task])
    write_suite(env, {
        "name": "gpt2-tiny", "family": {"kind": "gpt2_classification", "base": "../gpt2",
                                        "experts": {t: f"../experts/{t}" for t in GLUE_ROWS}},
        "tasks": [{"name": t, "dataset": f"../data/{t}", "split": "validation", "validation_split": None}
                  for t in GLUE_ROWS],
        "references": {"computed": ["stl"]}})
    report = submit(env, "gpt2-tiny")
    assert [o.status for o in report.outcomes] == ["ok", "ok"], report.outcomes

    # The STL reference with the family's own head equals the transformers classifier itself.
    clf = GPT2ForSequenceClassification.from_pretrained(env / "experts" / "mrpc").eval()
    tok = GPT2Tokenizer.from_pretrained(env / "gpt2")
    rows = GLUE_ROWS["mrpc"]
    with torch.no_grad():
        preds = [int(clf(**tok(a, b, return_tensors="pt")).logits.argmax()) for a, b in zip(rows["sentence1"],
                                                                                          rows["sentence2"])]
    expected = 100 * np.mean([p == y for p, y in zip(preds, rows["label"])])
    stl = {r["task"]: r for r in stored(env, "STL")}
    assert stl["mrpc"]["value"] == pytest.approx(expected) and stl["mrpc"]["n"] == 4
    merged = stored(env, "ta")
    assert [r["task"] for r in merged] == ["cola", "mrpc"] and all(0 <= r["value"] <= 100 for r in merged)


# ----------------------------------------------------------------------------- Flan-T5

T5_TASKS = {
    "cola": {"template": "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
                         "Answere 'acceptable' or 'unacceptable'.", "classes": ["unacceptable", "acceptable"]},
    "stsb": {"template": "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely "
                         "different) to 5 (completely similar), rate the similarity.", "classes": None},
}
T5_ROWS = {"cola": GLUE_ROWS["cola"],
           "stsb": {"sentence1": ["a cat", "a dog", "the sun", "red sky", "one cat"],
                    "sentence2": ["the cat", "one cat", "sun", "a sky", "a dog"],
                    "label": [4.2, 1.0, 3.6, 2.4, 0.8], "idx": list(range(5))}}


def tiny_t5_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for rows in T5_ROWS.values() for col in rows.values() for s in col if isinstance(s, str)
                    for w in s.split()} | {"acceptable", "unacceptable", "0.8", "1.0", "2.4", "3.6", "4.2", "."})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wl.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    return tok


def test_flan_t5_full_and_lora_experts(env):
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration
    tok = tiny_t5_tokenizer(env / "flan-t5")
    config = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(config).eval()
    base.save_pretrained(env / "flan-t5")
    # cola: a fully fine-tuned checkpoint; stsb: a LoRA adapter, like tanganke/flan-t5-base_glue-stsb_lora-16.
    perturbed(base, 1).save_pretrained(env / "experts" / "cola")
    lora = get_peft_model(T5ForConditionalGeneration.from_pretrained(env / "flan-t5"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # lora_B starts at zero; move it so the adapter changes the model
    lora.save_pretrained(env / "experts" / "stsb")
    assert (env / "experts" / "stsb" / "adapter_model.safetensors").is_file()
    for task in T5_TASKS:
        save_text_dataset(env / "data" / task, T5_ROWS[task])
    write_suite(env, {
        "name": "t5-tiny", "family": {"kind": "flan_t5", "base": "../flan-t5",
                                      "experts": {t: f"../experts/{t}" for t in T5_TASKS}},
        "tasks": [{"name": t, "dataset": f"../data/{t}", "split": "validation", "validation_split": None,
                   "metric": "spearman" if t == "stsb" else "exact_match", "templates": [spec["template"]],
                   "classes": spec["classes"]} for t, spec in T5_TASKS.items()],
        "references": {"computed": ["pretrained", "stl"]}})

    from harness.runner import open_suite
    family = open_suite("t5-tiny", torch.device("cpu")).family
    merged_lora = family.expert_state("stsb")
    dense = lora.merge_and_unload().state_dict()
    assert torch.allclose(merged_lora["encoder.block.0.layer.0.SelfAttention.q.weight"],
                          dense["encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert not torch.allclose(merged_lora["encoder.block.0.layer.0.SelfAttention.q.weight"],
                              family.base_state()["encoder.block.0.layer.0.SelfAttention.q.weight"])
    inputs, targets = family.eval_data("stsb", "validation")
    assert tok.batch_decode(targets[:2], skip_special_tokens=True) == ["4.2", "1.0"]

    # Greedy decoding through the family equals transformers' generate(max_length=10).
    from harness.evaluate import Predictor
    model = family.build(family.expert_state("cola"))
    inputs, _ = family.eval_data("cola", "validation")
    ours = family.predict(Predictor([model]), "cola", inputs, batch_size=4)
    theirs = model.generate(input_ids=inputs[:, 0], attention_mask=inputs[:, 1], max_length=10, do_sample=False)
    assert family._texts(ours) == family._texts(theirs)

    report = submit(env, "t5-tiny")
    assert [o.status for o in report.outcomes] == ["ok", "ok", "ok"], report.outcomes
    rows = {r["task"]: r for r in stored(env, "ta")}
    assert rows["cola"]["metric"] == "exact_match" and 0 <= rows["cola"]["value"] <= 100
    assert rows["stsb"]["metric"] == "spearman" and -100 <= rows["stsb"]["value"] <= 100
    assert rows["stsb"]["n"] == 5


def test_flan_t5_spearman_reads_unparseable_outputs_as_zero(env):
    from harness.families.flan_t5 import _number
    assert _number("3.4") == 3.4 and _number("yes") == 0.0 and _number("") == 0.0
