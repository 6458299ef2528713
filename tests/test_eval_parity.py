"""Evaluation parity with FusionBench: fbh's evaluation against fusion-bench's own task pools.

The merge differentials (test_differential_fusion_bench.py) prove that fbh fuses weights as
fusion-bench does; these prove that it *scores* them as fusion-bench does. Each test builds
tiny random-initialised models and tiny datasets in the real on-disk formats (save_pretrained,
datasets save_to_disk), runs fbh's real path (suite YAML -> family -> eval_data / logits ->
harness.evaluate.evaluate) and fusion-bench's (its task pool, or the functions its task pool
calls where the pool itself can only load from the hub), and compares per-example outputs
(max abs diff <= 1e-5) and the metric (identical).

The suite entries (class names, templates, prompts) are read from the shipped suite files, so
the catalog's copies of FusionBench's templates are checked against fusion-bench's package too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, save_random_image_datasets
from harness.spec import read_suite_yaml
from test_families import byte_vocab, perturbed, save_text_dataset, write_suite
from test_nyuv2 import N as NYUV2_N, nyuv2_env  # noqa: F401 -- the tiny dilated ResNet suite fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
fusion_bench = pytest.importorskip("fusion_bench")

ATOL = 1e-5




def shipped_task(suite: str, task: str) -> dict:
    spec = read_suite_yaml(REPO / "suites" / f"{suite}.yaml")
    return next(t for t in spec["tasks"] if t["name"] == task)


def open_family(name: str):
    from harness.runner import open_suite
    return open_suite(name, torch.device("cpu"), progress=lambda m: None).family


def fbh_rows(family, tasks: list[str], batch_size: int = 5) -> dict[str, dict]:
    """fbh's evaluate() on each task's expert, one row per task (the primary metric)."""
    from harness.evaluate import Predictor, evaluate
    out = {}
    for task in tasks:
        model = family.build(family.expert_state(task))
        (row, *_) = evaluate(Predictor([model]), family, [(task, "seen")], batch_size=batch_size)
        out[task] = row.as_dict()
    return out


# ----------------------------------------------------------------------------- CLIP vision

CLIP_PARITY_TASKS = ["eurosat", "gtsrb"]  # two of the eight, with FusionBench's real class names and templates


def tiny_clip_suite(root: Path) -> None:
    """A tiny CLIP (full CLIPModel + tokenizer + a processor that resizes 40x36 images to 32 and
    centre-crops) and one vision-tower expert per task; datasets of random images per task.
    The byte vocabulary spells prompts out a byte a token, so the text tower takes 160 positions
    (FusionBench's prompts fit CLIP's 77 with the real BPE)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel
    vocab = byte_vocab("<|startoftext|>", "<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=160, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(root / "clip")
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip")
    # OpenAI's processor settings (bicubic resize of the short side, centre crop, CLIP mean/std), at 32 px.
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    vision = CLIPVisionModel.from_pretrained(root / "clip")
    tasks = {t: shipped_task("clip-vit-b32-8tasks", t) for t in CLIP_PARITY_TASKS}
    for i, task in enumerate(tasks):
        perturbed(vision, i + 1, scale=0.05).save_pretrained(root / "experts" / task)
    save_random_image_datasets(root, {t: spec["classes"] for t, spec in tasks.items()})
    write_suite(root, {
        "name": "clip-parity", "family": {"kind": "clip_vision", "base": "../clip", "heads": "zero_shot",
                                          "experts": {t: f"../experts/{t}" for t in tasks}},
        "tasks": [spec | {"dataset": f"../data/{t}", "dataset_config": None} for t, spec in tasks.items()],
        "references": {"computed": []}})


def importable_clip_taskpool() -> None:
    """fusion-bench 0.2.33 imports `CLIPVisionTransformer` for type hints; transformers 5 folded that
    class into `CLIPVisionModel` (CLIPModel.vision_model is one), so the name is aliased to it."""
    from transformers import CLIPVisionModel
    from transformers.models.clip import modeling_clip
    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        modeling_clip.CLIPVisionTransformer = CLIPVisionModel


def fusion_bench_clip_pool(root: Path):
    """fusion-bench's CLIPVisionModelTaskPool on the same files, constructed with local objects
    (its hydra config would name hub ids)."""
    import datasets
    from transformers import CLIPModel, CLIPProcessor
    importable_clip_taskpool()
    from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool
    test = {t: datasets.load_from_disk(str(root / "data" / t))["test"] for t in CLIP_PARITY_TASKS}
    pool = CLIPVisionModelTaskPool(test, processor=CLIPProcessor.from_pretrained(root / "clip"),
                                   clip_model=CLIPModel.from_pretrained(root / "clip"),
                                   dataloader_kwargs={"batch_size": 5, "shuffle": False}, fast_dev_run=False)
    pool.setup()
    return pool


def test_clip_vision_evaluation_matches_fusion_bench_taskpool(private_env):
    from transformers import CLIPVisionModel
    from fusion_bench.models.hf_clip import HFCLIPClassifier
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    tiny_clip_suite(private_env)
    family = open_family("clip-parity")
    pool = fusion_bench_clip_pool(private_env)

    for task in CLIP_PARITY_TASKS:
        # The catalog's class names and templates are fusion-bench's, in label order.
        classnames, templates = get_classnames_and_templates(task)
        spec = family.suite.task(task)
        assert spec.classes == list(classnames)
        assert [t.replace("{c}", "X") for t in spec.templates] == [t("X") for t in templates]

        # Preprocessing: the same pixel values, image for image.
        inputs, labels = family.eval_data(task, "test")
        theirs = [(x, y) for x, y in pool.test_dataloaders[task]]
        their_inputs = torch.cat([x for x, _ in theirs])
        assert inputs.shape == their_inputs.shape == (12, 3, 32, 32)
        assert (inputs - their_inputs).abs().max() <= ATOL
        assert torch.equal(labels, torch.cat([y for _, y in theirs]))

        # Zero-shot head (templates averaged, normalised) and logit scale, then per-example logits.
        expert = CLIPVisionModel.from_pretrained(private_env / "experts" / task).eval()
        classifier = HFCLIPClassifier(pool.clip_model, pool.processor)
        classifier.clip_model.vision_model = expert
        classifier.set_classification_task(classnames, templates)
        assert (family.head(task) - classifier.zeroshot_weights).abs().max() <= ATOL
        with torch.no_grad():
            their_logits = torch.cat([classifier(x) for x, _ in theirs])
            ours = family.logits(family.build(family.expert_state(task)), task, inputs)
        assert (ours - their_logits).abs().max() <= ATOL
        assert torch.equal(ours.argmax(-1), their_logits.argmax(-1))

    # Accuracy: fbh's rows against the task pool's own evaluate(), expert by expert.
    rows = fbh_rows(family, CLIP_PARITY_TASKS)
    for task in CLIP_PARITY_TASKS:
        expert = CLIPVisionModel.from_pretrained(private_env / "experts" / task).eval()
        report = pool.evaluate(expert)
        assert rows[task]["metric"] == "accuracy" and rows[task]["n"] == 12
        assert rows[task]["value"] == 100 * report[task]["accuracy"]


# ----------------------------------------------------------------------------- GPT-2 classification

GPT2_ROWS = {  # lengths differ, so padding (side, length) and the pooled token matter
    "cola": {"sentence": ["the cat sat", "sat the cat on a very red mat", "a dog ran", "ran dog a far away",
                          "the red cat", "cat red the"], "label": [1, 0, 1, 0, 1, 0], "idx": list(range(6))},
    "mrpc": {"sentence1": ["a cat", "a dog that ran home", "the sun", "red sky at night"],
             "sentence2": ["the cat", "one cat", "sun over the hills", "a sky"], "label": [1, 0, 1, 0],
             "idx": list(range(4))},
}


def tiny_gpt2_suite(root: Path) -> None:
    """A tiny GPT-2 LM (like `gpt2`) and per task a GPT2ForSequenceClassification expert (like
    tanganke/gpt2_<task>). 512 positions: FusionBench pads every example to 512 tokens."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Tokenizer
    vocab = byte_vocab("<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(root / "gpt2")
    for i, task in enumerate(GPT2_ROWS):
        clf = GPT2ForSequenceClassification.from_pretrained(root / "gpt2", num_labels=2,
                                                            pad_token_id=config.eos_token_id)
        perturbed(clf, i + 1, scale=0.2).save_pretrained(root / "experts" / task)
        save_text_dataset(root / "data" / task, GPT2_ROWS[task])
    write_suite(root, {
        "name": "gpt2-parity", "family": {"kind": "gpt2_classification", "base": "../gpt2",
                                          "experts": {t: f"../experts/{t}" for t in GPT2_ROWS}},
        "tasks": [shipped_task("gpt2-glue", t) | {"dataset": f"../data/{t}", "dataset_config": None}
                  for t in GPT2_ROWS],
        "references": {"computed": []}})


def fusion_bench_gpt2_pool(root: Path):
    """fusion-bench's GPT2TextClassificationTaskPool over the GLUE splits tokenised by its own
    TokenizedGLUE functions (whose loaders read GLUE from the hub, so the tokenize functions are
    mapped over the local splits as those loaders map them), and its GPT-2 model pool."""
    from functools import partial
    import datasets
    from omegaconf import DictConfig
    from fusion_bench.dataset.gpt2_glue import cola_tokenize_function, mrpc_tokenize_function
    from fusion_bench.modelpool.huggingface_gpt2_classification import (GPT2ForSequenceClassificationPool,
                                                                          load_gpt2_tokenizer)
    from fusion_bench.taskpool.gpt2_text_classification import GPT2TextClassificationTaskPool
    # As fusion-bench's configs give it: a hydra target of its load_gpt2_tokenizer (pad = unk, 512 tokens).
    tokenizer_config = DictConfig({"_target_": f"{load_gpt2_tokenizer.__module__}.load_gpt2_tokenizer",
                                   "pretrained_model_name_or_path": str(root / "gpt2")})
    tokenizer = load_gpt2_tokenizer(str(root / "gpt2"))
    tokenize = {"cola": (cola_tokenize_function, ["sentence"]),
                "mrpc": (mrpc_tokenize_function, ["sentence1", "sentence2"])}
    test = {}
    for task, (fn, columns) in tokenize.items():
        split = datasets.load_from_disk(str(root / "data" / task))["validation"]
        tokenized = root / "fusion-bench" / task
        split.map(partial(fn, tokenizer=tokenizer), batched=True, remove_columns=columns).save_to_disk(str(tokenized))
        # The pool instantiates each test set from a config; its own targets load GLUE from the hub.
        test[task] = DictConfig({"_target_": "datasets.load_from_disk", "dataset_path": str(tokenized)})
    pool = GPT2TextClassificationTaskPool(test, tokenizer=tokenizer_config, dataloader_kwargs={"batch_size": 4},
                                          fast_dev_run=False)
    models = DictConfig({t: {"pretrained_model_name_or_path": str(root / "experts" / t)} for t in GPT2_ROWS})
    modelpool = GPT2ForSequenceClassificationPool(models=models, tokenizer=tokenizer_config)
    pool._program = type("Program", (), {"modelpool": modelpool})()  # where the pool looks for its classifiers
    return pool


def test_gpt2_classification_matches_fusion_bench_taskpool(private_env):
    from transformers import GPT2ForSequenceClassification
    tiny_gpt2_suite(private_env)
    family = open_family("gpt2-parity")
    pool = fusion_bench_gpt2_pool(private_env)
    rows = fbh_rows(family, list(GPT2_ROWS))
    for task in GPT2_ROWS:
        inputs, labels = family.eval_data(task, "validation")
        ids, mask = inputs[:, 0], inputs[:, 1]
        loader = list(pool.get_test_dataloader(task))
        their_ids = torch.cat([b["input_ids"] for b in loader])
        their_mask = torch.cat([b["attention_mask"] for b in loader])
        # fbh pads to the longest example, FusionBench to 512; both pad on the right with the same
        # token, so the real tokens and their masks agree position for position.
        assert their_ids.shape[1] == 512 and ids.shape[1] < 512
        assert torch.equal(ids, their_ids[:, :ids.shape[1]]) and torch.equal(mask, their_mask[:, :ids.shape[1]])
        assert not their_mask[:, ids.shape[1]:].any()
        assert torch.equal(labels, torch.cat([b["labels"] for b in loader]))

        # Logits: the fbh family's head on the last real token against fusion-bench's classifier
        # (the task's GPT2ForSequenceClassification with the evaluated body swapped in).
        expert = GPT2ForSequenceClassification.from_pretrained(private_env / "experts" / task).eval()
        classifier = pool.get_classifier(task, expert.transformer).eval()
        with torch.no_grad():
            theirs = torch.cat([classifier(b["input_ids"], attention_mask=b["attention_mask"]).logits
                                for b in loader])
            ours = family.logits(family.build(family.expert_state(task)), task, inputs)
        assert (ours - theirs).abs().max() <= ATOL

        result = pool.evaluate_single_task(task, expert.transformer, pool.get_test_dataloader(task))
        assert rows[task]["metric"] == "accuracy" and rows[task]["n"] == len(GPT2_ROWS[task]["label"])
        assert rows[task]["value"] == 100 * result["accuracy"]


# ----------------------------------------------------------------------------- Flan-T5 GLUE

T5_ROWS = {
    "cola": {"sentence": ["the cat sat", "sat the cat", "a dog ran", "ran dog a", "the red cat", "cat red the"],
             "label": [1, 0, 1, 0, 1, 0], "idx": list(range(6))},
    "stsb": {"sentence1": ["a cat", "a dog", "the sun", "red sky", "one cat", "the dog"],
             "sentence2": ["the cat", "one cat", "sun", "a sky", "a dog", "red sun"],
             "label": [4.2, 1.0, 3.6, 2.4, 0.8, 1.6], "idx": list(range(6))},
}
# What the tiny expert is taught to answer: some right, some wrong, one STSB answer not a number
# (FusionBench reads it as 0), so exact match and Spearman are neither 0 nor perfect. (It learns
# most of them; the test needs only that both sides decode the same answers.)
T5_TAUGHT = {"cola": ["acceptable", "unacceptable", "unacceptable", "unacceptable", "acceptable", "acceptable"],
             "stsb": ["4.2", "2.4", "3.6", "sun", "1.0", "0.8"]}


def t5_word_tokenizer(path: Path, prompts: list[str]):
    """A word-level tokenizer over the prompts' words, punctuation apart and decimals whole ('4.2'),
    so prompts, labels and answers round-trip; 512 tokens, like Flan-T5's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                     pre_tokenizers.Split(Regex(r"\d+\.\d+|\w+|[^\w\s]"), "isolated")])
    words = sorted({w for text in prompts for w, _ in split.pre_tokenize_str(text)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = split
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=512)
    tok.save_pretrained(path)
    return tok


def trained_tiny_t5(tok, prompts: list[str], answers: list[str]):
    """A tiny T5 taught `answers` for `prompts` (150 Adam steps), like a fine-tuned expert."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    x = tok(prompts, padding=True, return_tensors="pt")
    y = tok(answers, padding=True, return_tensors="pt")["input_ids"]
    y[y == tok.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        model(**x, labels=y).loss.backward()
        optimizer.step()
    return model.eval()


def tiny_t5_suite(root: Path):
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates
    tasks = {t: shipped_task("flan-t5-base-glue", t) for t in T5_ROWS}
    prompts = {t: [spec["templates"][0].format(**dict(zip(T5_ROWS[t], row))) for row in zip(*T5_ROWS[t].values())]
               for t, spec in tasks.items()}
    everything = [p for ps in prompts.values() for p in ps] + [a for ans in T5_TAUGHT.values() for a in ans]
    tok = t5_word_tokenizer(root / "flan-t5", everything + [f"{v:.1f}" for v in T5_ROWS["stsb"]["label"]]
                            + list(glue_prompt_templates["cola"]["target_text"].values()))
    from transformers import T5ForConditionalGeneration
    expert = trained_tiny_t5(tok, [p for t in T5_ROWS for p in prompts[t]], [a for t in T5_ROWS for a in T5_TAUGHT[t]])
    torch.manual_seed(1)
    T5ForConditionalGeneration(expert.config).save_pretrained(root / "flan-t5")  # an untrained base
    for task in T5_ROWS:
        expert.save_pretrained(root / "experts" / task)
        save_text_dataset(root / "data" / task, T5_ROWS[task])
    write_suite(root, {
        "name": "t5-parity", "family": {"kind": "flan_t5", "base": "../flan-t5",
                                        "experts": {t: f"../experts/{t}" for t in T5_ROWS}},
        "tasks": [spec | {"dataset": f"../data/{t}", "dataset_config": None} for t, spec in tasks.items()],
        "references": {"computed": []}})
    return tok


def fusion_bench_t5_loader(root: Path, task: str, tok):
    """The validation split as fusion-bench's _load_glue_dataset makes it (its GLUE preprocessor and
    prompt template, padded to max_length), read by a DataLoader as its task pool reads it; the
    loader itself reads GLUE from the hub, so its steps are applied to the local split."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import default_data_collator
    from fusion_bench.tasks.flan_t5_text_generation.glue_preprocessors import glue_processors
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates
    split = datasets.load_from_disk(str(root / "data" / task))["validation"]
    preprocessor = glue_processors[task](template=glue_prompt_templates[task], tokenizer=tok,
                                         tokenizer_kwargs={"padding": "max_length", "truncation": True,
                                                           "return_tensors": "pt"})
    # No num_proc: with it, datasets replaces os.environ by a plain copy, so later changes to the environment
    # (and every test fixture restoring it) act on an object no one reads.
    ds = split.map(preprocessor, batched=True, remove_columns=split.column_names)
    return DataLoader(ds, batch_size=4, shuffle=False, collate_fn=default_data_collator)


def test_flan_t5_glue_matches_fusion_bench_evaluation(private_env):
    from transformers import T5ForConditionalGeneration
    from fusion_bench.tasks.flan_t5_text_generation.glue_evaluation import evaluate_accuracy, evaluate_spearman_rho
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates
    from harness.evaluate import Predictor
    tok = tiny_t5_suite(private_env)
    family = open_family("t5-parity")
    rows = fbh_rows(family, list(T5_ROWS), batch_size=4)
    for task in T5_ROWS:
        template = glue_prompt_templates[task]
        spec = family.suite.task(task)
        assert spec.templates == [template["input_text"]]
        if isinstance(template["target_text"], dict):
            assert spec.classes == [template["target_text"][str(i)] for i in range(len(spec.classes))]

        inputs, targets = family.eval_data(task, "validation")
        loader = fusion_bench_t5_loader(private_env, task, tok)
        batches = list(loader)
        their_ids = torch.cat([b["input_ids"] for b in batches])
        n = inputs.shape[2]
        assert torch.equal(inputs[:, 0], their_ids[:, :n]) and not their_ids[:, n:].any()  # same prompts, padded
        their_labels = torch.cat([b["labels"] for b in batches])
        assert torch.equal(targets, their_labels[:, :targets.shape[1]].clamp(min=0))

        # Generation: fbh's greedy decoder against fusion-bench's generate(input_ids, max_length=10).
        model = T5ForConditionalGeneration.from_pretrained(private_env / "experts" / task).eval()
        ours = family._texts(family.predict(Predictor([family.build(family.expert_state(task))]), task, inputs, 4))
        with torch.no_grad():
            generated = [model.generate(b["input_ids"], max_length=10) for b in batches]
            theirs = [s for g in generated for s in tok.batch_decode(g, skip_special_tokens=True)]
        assert ours == theirs

        if task == "stsb":
            assert "sun" in ours  # an unparseable answer, read as 0 by both
            value = 100 * evaluate_spearman_rho(model, loader, tok)
            assert rows[task]["metric"] == "spearman" and 0 < abs(value) < 100
        else:
            value = 100 * evaluate_accuracy(model, loader, tok)
            assert rows[task]["metric"] == "exact_match" and 0 < value < 100
        assert rows[task]["value"] == pytest.approx(value, abs=1e-9)


# ----------------------------------------------------------------------------- NYUv2


NYUV2_METRICS = {  # fbh metric -> (fusion-bench metric class, index in its compute(), fbh's unit factor)
    "miou": ("segmentation", 0, 100), "pixel_accuracy": ("segmentation", 1, 100),
    "abs_err": ("depth", 0, 100), "rel_err": ("depth", 1, 100), "mean_angle": ("normal", 0, 1),
}


def test_nyuv2_metrics_match_fusion_bench_metric_classes(nyuv2_env):
    """Each expert's rows from fbh's evaluate() against fusion-bench's SegmentationMetric, DepthMetric
    and NormalMetric updated batch by batch, as its NYUv2MTLModule's validation does, with the same
    outputs; batches of 4, so the tiny split takes two and accumulation across batches is checked."""
    from fusion_bench.metrics.nyuv2 import metric_classes
    from harness.evaluate import Predictor, evaluate
    family = open_family("resnet50-nyuv2")
    for task in ("segmentation", "depth", "normal"):
        model = family.build(family.expert_state(task))
        rows = {r.metric: r.value for r in evaluate(Predictor([model]), family, [(task, "seen")], batch_size=4)}
        inputs, targets = family.eval_data(task, "test")
        metric = metric_classes[task]()
        with torch.no_grad():
            for start in range(0, NYUV2_N, 4):
                outputs = family.logits(model, task, inputs[start:start + 4])
                target = targets[start:start + 4]
                # fusion-bench's loader gives segmentation labels as floats with -1 for unlabelled pixels.
                metric.update(outputs, torch.where(target == 255, -1, target.long()).float()
                              if task == "segmentation" else target)
        theirs = metric.compute()
        assert rows, task
        for name, value in rows.items():
            kind, index, unit = NYUV2_METRICS[name]
            assert kind == task
            assert value == pytest.approx(unit * float(theirs[index]), rel=1e-6, abs=1e-6), name


def test_nyuv2_depth_errors_pool_valid_pixels_over_batches_as_fusion_bench_does():
    """FusionBench's DepthMetric keeps one mean per batch, but weights it by `preds.size(0)` taken after
    `masked_select`, i.e. the batch's count of valid pixels, not of images: its batched number is the
    mean over every valid pixel of the split, as fbh pools it. Checked over batches of 16 whose images
    have different numbers of missing measurements (real NYUv2's do), where an image-weighted mean of
    batch means would differ."""
    from fusion_bench.metrics.nyuv2 import metric_classes
    from harness.families.resnet_nyuv2 import DEPTH, metric_of_sums, per_image_sums
    g = torch.Generator().manual_seed(0)
    n, batch = 37, 16  # batches of 16, 16 and 5, like NYUv2's 654 test images in FusionBench's batches of 16
    targets = torch.rand(n, 1, 8, 8, generator=g) * 4 + 0.5
    for i in range(n):
        targets[i, :, : i % 7] = 0  # 0 to 6 rows of missing measurements
    outputs = targets + torch.randn(n, 1, 8, 8, generator=g)
    sums = per_image_sums(DEPTH, outputs, targets)

    fusion_bench_depth = metric_classes["depth"]()
    for start in range(0, n, batch):
        fusion_bench_depth.update(outputs[start:start + batch], targets[start:start + batch])
    theirs = fusion_bench_depth.compute()
    valid = targets != 0
    for index, metric in enumerate(["abs_err", "rel_err"]):
        assert metric_of_sums(metric, sums.sum(0)) == pytest.approx(100 * float(theirs[index]), rel=1e-6)
        per_pixel = (outputs - targets).abs() / (targets if metric == "rel_err" else 1)
        image_weighted = sum(len(b) * float(per_pixel[start:start + batch][valid[start:start + batch]].mean())
                             for start in range(0, n, batch) for b in [outputs[start:start + batch]]) / n
        assert abs(100 * image_weighted - 100 * float(theirs[index])) > 1e-3  # what it is not


def test_flan_t5_exact_match_keeps_trailing_spaces_as_fusion_bench(private_env):
    """With a sentencepiece-style tokenizer (Metaspace, as Flan-T5's), an answer ending in a lone '▁'
    decodes with a trailing space. FusionBench compares decoded strings as they are, so that is no
    exact match; fbh used to strip it into one. Both now agree, answer for answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from fusion_bench.tasks.flan_t5_text_generation.glue_evaluation import evaluate_accuracy
    template = shipped_task("flan-t5-base-glue", "cola")["templates"][0]
    rows = T5_ROWS["cola"]
    prompts = [template.format(sentence=s) for s in rows["sentence"]]
    metaspace = pre_tokenizers.Metaspace()
    words = sorted({w for p in prompts + ["acceptable unacceptable"] for w, _ in metaspace.pre_tokenize_str(p)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "▁": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = metaspace, decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=512)
    tok.save_pretrained(private_env / "flan-t5")
    # Taught: the right word, half of them followed by a lone '▁' (decoded: 'acceptable ').
    answers = [[vocab["▁acceptable" if y else "▁unacceptable"]] + ([3] if i % 2 else []) + [1]
               for i, y in enumerate(rows["label"])]
    expert = trained_tiny_t5(tok, prompts, [tok.decode(a) for a in answers])
    theirs_answers = tok.batch_decode(expert.generate(tok(prompts, padding=True, return_tensors="pt")["input_ids"],
                                                      max_length=10), skip_special_tokens=True)
    assert any(a.endswith(" ") for a in theirs_answers)  # the case this test is about occurs
    expert.save_pretrained(private_env / "flan-t5")
    expert.save_pretrained(private_env / "experts" / "cola")
    save_text_dataset(private_env / "data" / "cola", rows)
    write_suite(private_env, {
        "name": "t5-space", "family": {"kind": "flan_t5", "base": "../flan-t5", "experts": {"cola": "../experts/cola"}},
        "tasks": [shipped_task("flan-t5-base-glue", "cola") | {"dataset": "../data/cola", "dataset_config": None}],
        "references": {"computed": []}})
    family = open_family("t5-space")
    (row,) = fbh_rows(family, ["cola"], batch_size=4).values()
    value = 100 * evaluate_accuracy(expert, fusion_bench_t5_loader(private_env, "cola", tok), tok)
    assert row["value"] == pytest.approx(value, abs=1e-9)
    stripped = 100 * np.mean([a.strip() == ("acceptable" if y else "unacceptable")
                              for a, y in zip(theirs_answers, rows["label"])])
    assert value < stripped  # stripping would have counted the spaced answers


def test_flan_t5_spearman_of_constant_answers_is_0_where_fusion_bench_gives_nan(private_env):
    """The one deliberate difference in the Flan-T5 metrics: when every answer parses to the same
    number (typically all unparseable, read as 0), Spearman's rho is undefined; scipy, so FusionBench,
    gives NaN, fbh gives 0 (no rank agreement). No published row is NaN, so no paper number depends
    on it; a NaN would leave the row out of every average and ranking."""
    from transformers import T5ForConditionalGeneration
    from fusion_bench.tasks.flan_t5_text_generation.glue_evaluation import evaluate_spearman_rho
    from harness.evaluate import Predictor, evaluate
    tok = tiny_t5_suite(private_env)
    family = open_family("t5-parity")
    base = T5ForConditionalGeneration.from_pretrained(private_env / "flan-t5").eval()
    inputs, _ = family.eval_data("stsb", "validation")
    answers = family._texts(family.predict(Predictor([family.build(family.base_state())]), "stsb", inputs, 4))
    assert len(set(answers)) == 1  # the untrained base answers alike (here: nothing) to every prompt
    (row,) = evaluate(Predictor([family.build(family.base_state())]), family, [("stsb", "seen")], batch_size=4)
    with pytest.warns(Warning):
        theirs = evaluate_spearman_rho(base, fusion_bench_t5_loader(private_env, "stsb", tok), tok)
    assert np.isnan(theirs) and row.value == 0.0


def test_nyuv2_miou_skips_classes_absent_from_truth_and_prediction_where_fusion_bench_gives_nan():
    """The one deliberate NYUv2 difference: a class in neither truth nor prediction has no IoU.
    fusion-bench's plain mean over classes is then NaN; fbh averages the classes that occur. On the
    full NYUv2 test set every class occurs, so Table 4's mIoU is the same either way (as here, once
    every class occurs)."""
    from fusion_bench.metrics.nyuv2 import metric_classes
    from harness.families.resnet_nyuv2 import SEGMENTATION, metric_of_sums, per_image_sums
    g = torch.Generator().manual_seed(0)
    for present in (12, 13):  # classes 0..present-1 occur
        target = torch.randint(0, present, (3, 8, 8), generator=g)
        logits = torch.randn(3, 13, 8, 8, generator=g)
        logits[:, present:] = -1e9  # never predicted either
        ours = metric_of_sums("miou", per_image_sums(SEGMENTATION, logits.argmax(1), target, 13).sum(0))
        theirs = metric_classes["segmentation"]()
        theirs.update(logits, target.float())
        miou, pixel_accuracy = theirs.compute()
        assert metric_of_sums("pixel_accuracy", per_image_sums(SEGMENTATION, logits.argmax(1), target, 13).sum(0)) \
            == pytest.approx(100 * float(pixel_accuracy), rel=1e-6)
        if present == 13:
            assert ours == pytest.approx(100 * float(miou), rel=1e-6)
        else:
            assert torch.isnan(miou) and 0 < ours < 100
