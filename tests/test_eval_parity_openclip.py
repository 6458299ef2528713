"""Evaluation parity with FusionBench for OpenCLIP vision: fbh's open_clip_vision family against
fusion-bench 0.2.33's OpenCLIPVisionModelTaskPool (fusion_bench/taskpool/openclip_vision).

The companion of test_eval_parity.py (CLIP, GPT-2, Flan-T5, NYUv2), in its own file because
open_clip needs torchvision, which lives in the openclip environment (README, 'OpenCLIP suites').
A tiny random open_clip model saved in open_clip's model-folder format, one fine-tuned vision
tower per task and random-image datasets on disk; fbh's real path (suite YAML -> load_family ->
eval_data / head / logits -> harness.evaluate.evaluate) against fusion-bench's:

- preprocessing and the accuracy loop: the real OpenCLIPVisionModelTaskPool (setup(), its
  test_dataloaders over its CLIPDataset, evaluate() with torchmetrics' accuracy), given its
  processor through a real OpenCLIPVisionModelPool, as a fusion-bench program gives it.
- the model: fusion-bench's ImageEncoder (forward = open_clip's encode_image) in its
  ImageClassifier. ImageEncoder.__init__ accepts only hub names (its MODELS list, downloaded),
  so the test fills the three attributes that __init__ sets (model, train_preprocess,
  val_preprocess) from the call __init__ makes, open_clip.create_model_and_transforms, on the
  local folder.
- the heads: fusion-bench 0.2.33 has no code that builds OpenCLIP zero-shot heads; its pool
  loads ClassificationHead objects that the Task Arithmetic code (task_vectors, heads.py) made
  from the text tower. So the reference weights are built here by that recipe with open_clip's
  own tokenizer and encode_text (per class: each template's embedding normalised, averaged,
  renormalised, times logit_scale.exp()) and put into fusion-bench's ClassificationHead
  (normalize=True, zero bias), which computes the logits. That recipe is task_vectors', not
  fusion-bench's; fusion-bench's own part is the class names and templates
  (fusion_bench.tasks.clip_classification), which the shipped suite's copies are checked against.

The tiny model's text tower takes 16 tokens, so its tokenizer (open_clip.get_tokenizer on the
folder) cuts long prompts on both sides alike; the real ViT-B-32 takes 77.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import typing

import pytest
import torch
import yaml

from conftest import REPO, save_random_image_datasets
from harness.spec import read_suite_yaml

pytestmark = pytest.mark.openclip

ATOL = 1e-5
TASKS = ["eurosat", "gtsrb"]  # two of the eight, with FusionBench's real class names and templates
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(autouse=True, scope="module")
def fusion_bench_present():
    """fusion-bench is in the openclip environment CI makes (.ci/openclip_requirements.py), so there
    FBH_REQUIRE_OPENCLIP turns its absence into a failure, as conftest does for open_clip."""
    # fusion_bench, once imported, replaces itself by a lazy module without __spec__: find_spec then raises.
    if "fusion_bench" not in sys.modules and importlib.util.find_spec("fusion_bench") is None:
        if os.environ.get("FBH_REQUIRE_OPENCLIP"):
            pytest.fail("fusion_bench is not installed, and FBH_REQUIRE_OPENCLIP=1 requires it")
        pytest.skip("needs fusion-bench==0.2.33 in the openclip environment")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads on a shared machine
    yield
    torch.set_num_threads(before)


def importable_openclip_taskpool() -> None:
    """fusion-bench 0.2.33's modelpool/openclip_vision/modelpool.py imports `typing.override`, which
    Python has from 3.12 on; on 3.11 the name is aliased to typing_extensions' (the same decorator)."""
    if not hasattr(typing, "override"):
        import typing_extensions
        typing.override = typing_extensions.override


def shipped_task(task: str) -> dict:
    spec = read_suite_yaml(REPO / "suites" / "openclip-vit-b-32-8tasks.yaml")
    return next(t for t in spec["tasks"] if t["name"] == task)


@pytest.fixture()
def openclip_env(tmp_path, private_env):
    """The base as open_clip saves a model folder, vision-tower experts as safetensors (whole-CLIP
    `visual.` keys), datasets from save_to_disk and the suite YAML."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY).eval()
    base = tmp_path / "openclip-tiny"
    base.mkdir()
    (base / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(base / "open_clip_model.safetensors"))
    (tmp_path / "experts").mkdir()
    experts = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        experts[task] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in clip.visual.state_dict().items()}
        save_file({"visual." + k: v.contiguous() for k, v in experts[task].items()},
                  str(tmp_path / "experts" / f"{task}.safetensors"))
    tasks = {t: shipped_task(t) for t in TASKS}
    save_random_image_datasets(tmp_path, {t: spec["classes"] for t, spec in tasks.items()})
    spec = {"name": "openclip-parity", "family": {
                "kind": "open_clip_vision", "base": "../openclip-tiny", "heads": "zero_shot",
                "experts": {t: f"../experts/{t}.safetensors" for t in TASKS}},
            "tasks": [s | {"dataset": f"../data/{t}", "validation_split": None} for t, s in tasks.items()],
            "references": {"computed": []}}
    path = tmp_path / "suites" / "openclip-parity.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, path, experts


def fusion_bench_encoder(root, visual_state: dict | None):
    """fusion-bench's ImageEncoder on the local folder (see the module docstring)."""
    import open_clip
    from torch import nn
    from fusion_bench.models.open_clip import ImageEncoder
    encoder = ImageEncoder.__new__(ImageEncoder)
    nn.Module.__init__(encoder)
    encoder.model, encoder.train_preprocess, encoder.val_preprocess = \
        open_clip.create_model_and_transforms(f"local-dir:{root / 'openclip-tiny'}")
    if visual_state is not None:
        encoder.model.visual.load_state_dict(visual_state)
    return encoder.eval()


@torch.no_grad()
def task_vectors_head(root, task: str):
    """The Task Arithmetic recipe for a zero-shot head (task_vectors heads.py), with fusion-bench's
    class names and templates, in fusion-bench's ClassificationHead."""
    import open_clip
    from fusion_bench.models.open_clip import ClassificationHead
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    classnames, templates = get_classnames_and_templates(task)
    model = open_clip.create_model_and_transforms(f"local-dir:{root / 'openclip-tiny'}")[0].eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{root / 'openclip-tiny'}")
    rows = []
    for name in classnames:
        embeddings = model.encode_text(tokenizer([t(name) for t in templates]))
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        embeddings = embeddings.mean(dim=0)
        rows.append(embeddings / embeddings.norm())
    return ClassificationHead(normalize=True, weights=model.logit_scale.exp() * torch.stack(rows).float())


def fusion_bench_pool(root):
    import datasets
    importable_openclip_taskpool()
    from fusion_bench.modelpool import OpenCLIPVisionModelPool
    from fusion_bench.taskpool.openclip_vision.openclip_taskpool import OpenCLIPVisionModelTaskPool
    test = {t: datasets.load_from_disk(str(root / "data" / t))["test"] for t in TASKS}
    pool = OpenCLIPVisionModelTaskPool(test, classification_heads={t: task_vectors_head(root, t) for t in TASKS},
                                       dataloader_kwargs={"batch_size": 5, "shuffle": False}, fast_dev_run=False)
    # Its processor is the model pool's test_processor: the pre-trained ImageEncoder's val_preprocess.
    modelpool = OpenCLIPVisionModelPool(models={"_pretrained_": fusion_bench_encoder(root, None)})
    pool._program = type("Program", (), {"modelpool": modelpool})()
    pool.setup()
    return pool


def test_openclip_vision_evaluation_matches_fusion_bench_taskpool(openclip_env):
    from fusion_bench.models.open_clip import ImageClassifier
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    from harness.evaluate import Predictor, evaluate
    from harness.families import load_family
    from harness.spec import load_suite
    root, path, experts = openclip_env
    family = load_family(load_suite(path), path, None, torch.device("cpu"))
    pool = fusion_bench_pool(root)

    for task in TASKS:
        # The catalog's class names and templates are fusion-bench's, in label order.
        classnames, templates = get_classnames_and_templates(task)
        spec = family.suite.task(task)
        assert spec.classes == list(classnames)
        assert [t.replace("{c}", "X") for t in spec.templates] == [t("X") for t in templates]

        # Preprocessing: open_clip's transform as fusion-bench's pool applies it, image for image.
        inputs, labels = family.eval_data(task, "test")
        theirs = list(pool.test_dataloaders[task])
        their_inputs = torch.cat([x for x, _ in theirs])
        assert inputs.shape == their_inputs.shape == (12, 3, 32, 32)
        assert (inputs - their_inputs).abs().max() <= ATOL
        assert torch.equal(labels, torch.cat([y for _, y in theirs]))

        # Zero-shot head: fbh keeps it unit-norm and the logit scale apart; the head carries both.
        head, ours_head = pool.classifier_heads[task], family.head(task)  # head() also sets the scale
        assert family._scale != 100.0  # the tiny model's own logit_scale.exp(), not the default
        assert (family._scale * ours_head - head.weight).abs().max() <= ATOL
        assert not head.bias.any()

        # Per-example logits of the task's expert: fbh's family against fusion-bench's ImageClassifier.
        classifier = ImageClassifier(fusion_bench_encoder(root, experts[task]), head).eval()
        with torch.no_grad():
            their_logits = torch.cat([classifier(x) for x, _ in theirs])
            ours = family.logits(family.build(family.expert_state(task)), task, inputs)
        assert ours.shape == (12, len(classnames))
        assert (ours - their_logits).abs().max() <= ATOL
        assert torch.equal(ours.argmax(-1), their_logits.argmax(-1))

    # Accuracy: fbh's evaluate() rows against the task pool's own evaluate(), expert by expert
    # (and the pre-trained model, whose tower is the base's).
    for member, state in [("pretrained", None)] + [(t, experts[t]) for t in TASKS]:
        model = family.build(family.base_state() if state is None else family.expert_state(member))
        rows = evaluate(Predictor([model]), family, [(t, "seen") for t in TASKS], batch_size=5)
        report = pool.evaluate(fusion_bench_encoder(root, state))
        assert sorted(r.task for r in rows) == sorted(TASKS)
        for row in (r.as_dict() for r in rows):
            assert row["metric"] == "accuracy" and row["n"] == 12 and row["condition"] == "clean"
            assert row["value"] == 100 * report[row["task"]]["accuracy"], (member, row, report)
