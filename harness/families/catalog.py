"""FusionBench's real suites, as data: hub ids, datasets, class names, prompt templates and
the paper's published rows. `python -m harness.families.catalog [DIR]` writes suites/*.yaml.

Model and dataset ids, CLIP class names and templates, and the Flan-T5 GLUE prompt templates
are copied from the fusion-bench package (MIT licence, (c) Anke Tang et al.); published rows
from the FusionBench paper (arXiv:2406.03280), each with its table number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

# ----------------------------------------------------------------------------- CLIP

CLIP_BACKBONES = {  # suite prefix -> (base id, expert id prefix)
    "clip-vit-b32": "openai/clip-vit-base-patch32",
    "clip-vit-b16": "openai/clip-vit-base-patch16",
    "clip-vit-l14": "openai/clip-vit-large-patch14",
}
# FusionBench task name -> (dataset id, config, test split, label column, image column)
CLIP_DATASETS = {
    "sun397": ("tanganke/sun397", None, "test", "label", None),
    "stanford-cars": ("tanganke/stanford_cars", None, "test", "label", None),
    "resisc45": ("tanganke/resisc45", None, "test", "label", None),
    "eurosat": ("tanganke/eurosat", None, "test", "label", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "test", "label", None),
    "gtsrb": ("tanganke/gtsrb", None, "test", "label", None),
    "mnist": ("ylecun/mnist", None, "test", "label", None),
    "dtd": ("tanganke/dtd", None, "test", "label", None),
    "oxford_flowers102": ("dpdl-benchmark/oxford_flowers102", None, "test", "label", None),
    "pcam": ("1aurent/PatchCamelyon", None, "test", "label", None),
    "fer2013": ("clip-benchmark/wds_fer2013", None, "test", "cls", "jpg"),
    "oxford-iiit-pet": ("timm/oxford-iiit-pet", None, "test", "label", None),
    "stl10": ("tanganke/stl10", None, "test", "label", None),
    "cifar100": ("tanganke/cifar100", None, "test", "fine_label", None),
    "cifar10": ("tanganke/cifar10", None, "test", "label", None),
    "food101": ("ethz/food101", None, "validation", "label", None),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None, "test", "label", None),
    "emnist_letters": ("tanganke/emnist_letters", None, "test", "label", None),
    "kmnist": ("tanganke/kmnist", None, "test", "label", None),
    "rendered-sst2": ("nateraw/rendered-sst2", None, "test", "label", None),
}
CLIP_TASK_SETS = {  # Task Arithmetic's eight; TALL 14 and 20 (Wang et al., arXiv:2405.07813)
    "8tasks": list(CLIP_DATASETS)[:8],
    "14tasks": list(CLIP_DATASETS)[:14],
    "20tasks": list(CLIP_DATASETS),
}
TEMPLATE_MODULE = {"stanford-cars": "stanford_cars", "oxford-iiit-pet": "oxford_iiit_pet",
                   "oxford_flowers102": "flower102", "rendered-sst2": "rendered_sst2"}
CORRUPTIONS = ["motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast", "jpeg"]
ROBUSTNESS_TASKS = ["stanford-cars", "eurosat", "resisc45", "gtsrb"]
GENERALIZATION = [  # the paper's two seen/unseen splits for CLIP-ViT-B/32
    {"name": "exp1-table5", "seen": ["sun397", "stanford-cars", "resisc45", "dtd", "svhn", "gtsrb"],
     "unseen": ["mnist", "eurosat"], "source": "FusionBench Table 5"},
    {"name": "exp2-table16", "seen": ["sun397", "stanford-cars", "gtsrb", "eurosat", "dtd", "mnist"],
     "unseen": ["resisc45", "svhn"], "source": "FusionBench Table 16"},
]


def clip_classes_and_templates(task: str) -> tuple[list[str], list[str]]:
    """From fusion_bench.tasks.clip_classification: templates are lambdas; calling them with
    '{c}' turns each back into the string form the suite stores."""
    import importlib
    mod = importlib.import_module(f"fusion_bench.tasks.clip_classification.{TEMPLATE_MODULE.get(task, task)}")
    classes = list(getattr(mod, "classnames", None) or getattr(mod, "fine_label"))
    templates = [t("{c}") for t in mod.templates]
    assert all(t.count("{c}") == 1 for t in templates), task
    return classes, templates


def clip_task(name: str) -> dict:
    dataset, config, split, label, image = CLIP_DATASETS[name]
    classes, templates = clip_classes_and_templates(name)
    task = {"name": name, "dataset": dataset}
    if config:
        task["dataset_config"] = config
    task |= {"split": split, "validation_split": None}
    if image:
        task["input_columns"] = [image]
    if label != "label":
        task["label_column"] = label
    return task | {"classes": classes, "templates": templates}


def clip_suite(prefix: str, set_name: str, tasks: list[str], **extra) -> dict:
    base = CLIP_BACKBONES[prefix]
    expert_prefix = "tanganke/" + base.split("/")[1]
    return {
        "name": f"{prefix}-{set_name}",
        "title": f"CLIP-ViT-{prefix[-3].upper()}/{prefix[-2:]} on {len(tasks)} image classification tasks",
        "description": f"FusionBench's {base} experts ({expert_prefix}_<task>); zero-shot heads from the "
                       "pre-trained text tower with each dataset's prompt templates averaged; only the vision "
                       "encoder is fused.",
        "family": {"kind": "clip_vision", "base": base, "heads": "zero_shot",
                   "experts": {t: f"{expert_prefix}_{t}" for t in tasks}},
        "tasks": [clip_task(t) for t in tasks],
        "eval_batch_size": 128,
        **extra,
    }


# ----------------------------------------------------------------------------- OpenCLIP

# FusionBench's OpenCLIP models (paper Table 2) are the Task Arithmetic authors' (Ilharco et al.):
# open_clip architecture + 'openai' tag as base, one fine-tuned vision tower per task, which
# FusionBench reads from .cache/task_vectors_checkpoints/<arch>/<Dataset>/finetuned.pt.
OPENCLIP_BACKBONES = {  # suite prefix -> (open_clip architecture, hub folder of its 'openai' tag)
    "openclip-vit-b-32": ("ViT-B-32", "timm/vit_base_patch32_clip_224.openai"),
    "openclip-vit-b-16": ("ViT-B-16", "timm/vit_base_patch16_clip_224.openai"),
    "openclip-vit-l-14": ("ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
}
OPENCLIP_DIRS = {"sun397": "SUN397", "stanford-cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT",
                 "svhn": "SVHN", "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD"}
OPENCLIP_CHECKPOINTS = "../.cache/task_vectors_checkpoints"  # FusionBench's model_dir, from suites/


def openclip_suite(prefix: str) -> dict:
    arch, base = OPENCLIP_BACKBONES[prefix]
    tasks = CLIP_TASK_SETS["8tasks"]
    return {
        "name": f"{prefix}-8tasks",
        "title": f"OpenCLIP {arch} on 8 image classification tasks",
        "description": f"The Task Arithmetic experts of open_clip {arch} ('openai' weights, {base}) that FusionBench "
                       "uses, converted to safetensors (README, 'OpenCLIP suites'); zero-shot heads from the "
                       "pre-trained text tower with each dataset's prompt templates averaged; only the vision "
                       "encoder is fused. Needs the openclip extra.",
        "family": {"kind": "open_clip_vision", "base": base, "heads": "zero_shot",
                   "experts": {t: f"{OPENCLIP_CHECKPOINTS}/{arch}/{OPENCLIP_DIRS[t]}/finetuned.safetensors"
                               for t in tasks}},
        "tasks": [clip_task(t) for t in tasks],
        "eval_batch_size": 128,
        # The paper lists these models (Table 2) but publishes no OpenCLIP numbers: no published rows.
        "references": {"computed": ["pretrained", "stl"]},
    }


# ----------------------------------------------------------------------------- GLUE

GLUE = {  # task -> (config, test split, input columns)
    "cola": ("cola", "validation", ["sentence"]),
    "mnli": ("mnli", "validation_matched", ["premise", "hypothesis"]),
    "mrpc": ("mrpc", "validation", ["sentence1", "sentence2"]),
    "qnli": ("qnli", "validation", ["question", "sentence"]),
    "qqp": ("qqp", "validation", ["question1", "question2"]),
    "rte": ("rte", "validation", ["sentence1", "sentence2"]),
    "sst2": ("sst2", "validation", ["sentence"]),
    "stsb": ("stsb", "validation", ["sentence1", "sentence2"]),
}


def glue_task(name: str, **extra) -> dict:
    config, split, columns = GLUE[name]
    return {"name": name, "dataset": "nyu-mll/glue", "dataset_config": config, "split": split,
            "validation_split": None, "input_columns": columns, **extra}


def flan_t5_task(name: str) -> dict:
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates
    template = glue_prompt_templates[name]
    target = template["target_text"]
    classes = [target[str(i)] for i in range(len(target))] if isinstance(target, dict) else None
    return glue_task(name, metric="spearman" if name == "stsb" else "exact_match",
                     templates=[template["input_text"]], classes=classes)


def flan_t5_suite(size: str, lora: bool) -> dict:
    base = f"google/flan-t5-{size}"
    suffix = "_lora-16" if lora else ""
    name = f"flan-t5-{size}{'-lora' if lora else ''}-glue"
    return {
        "name": name,
        "title": f"Flan-T5-{size}{' (LoRA)' if lora else ''} on eight GLUE tasks, text to text",
        "description": "GLUE as text-to-text generation with the paper's prompt templates (Appendix D); "
                       + ("LoRA adapters (r=16) are merged into dense weights before fusion; " if lora else "")
                       + "exact match, STSB Spearman with unparseable outputs as 0. Tested on GLUE validation.",
        "family": {"kind": "flan_t5", "base": base,
                   "experts": {t: f"tanganke/flan-t5-{size}_glue-{t}{suffix}" for t in GLUE}},
        "tasks": [flan_t5_task(t) for t in GLUE],
        "eval_batch_size": 64,
    }


# ----------------------------------------------------------------------------- published rows

def rows(source: str, tasks: list[str], table: str, tolerance: float = 0.5, **extra) -> list[dict]:
    """Parse 'Label | v1 v2 ...' lines (the paper's order of tasks) into published rows."""
    out = []
    for label, nums in table_lines(table):
        if len(nums) != len(tasks):  # a copied column too many or too few would shift every value after it
            raise ValueError(f"{source}, row '{label}': {len(nums)} values for {len(tasks)} columns {tasks}")
        out.append({"label": label.strip(), "source": source, "tolerance": tolerance,
                    "values": dict(zip(tasks, nums)), **extra})
    return out


def table_lines(table: str) -> list[tuple[str, list[float]]]:
    """(label, values) per line of a copied table."""
    out = []
    for line in table.strip().splitlines():
        label, values = line.split("|")
        out.append((label.strip(), [float(v) for v in values.split()]))
    return out


PAPER_8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
TABLE_3 = """
Pre-trained | 63.2 59.8 60.7 46.0 31.6 32.5 48.2 43.9
Fine-tuned (STL) | 75.0 78.3 95.2 99.0 97.3 98.9 99.6 79.7
Weight Averaging | 65.4 62.6 70.8 76.9 64.5 54.9 86.3 50.9
Fisher Merging | 66.7 64.0 72.2 91.6 69.0 64.3 83.5 53.7
RegMean | 67.8 68.9 82.5 94.4 90.6 79.2 97.6 63.2
Task Arithmetic | 57.1 55.7 64.9 76.7 77.9 68.5 96.1 47.2
Ties-Merging | 67.1 64.2 74.1 76.8 77.7 69.4 94.1 54.0
task-wise AdaMerging | 58.6 56.9 69.8 82.4 70.3 58.9 97.2 55.3
layer-wise AdaMerging | 67.9 71.3 83.5 92.7 87.4 92.9 98.2 67.0
WEMoE (Model Mixing) | 73.7 76.8 93.4 98.2 96.8 98.2 99.6 76.6
"""
TABLE_14 = """
Pre-trained | 68.3 77.8 71.0 58.9 58.4 50.6 76.4 55.5
Fine-tuned (STL) | 82.8 92.9 97.4 99.2 97.9 99.2 99.8 85.5
Weight Averaging | 72.5 81.5 82.2 90.0 81.6 74.0 96.6 61.8
Fisher Merging | 70.6 79.4 84.1 98.1 74.7 85.0 89.5 61.0
RegMean | 75.3 88.4 90.0 97.1 95.9 92.4 98.5 72.6
Task Arithmetic | 72.0 79.0 80.5 86.0 87.5 83.5 98.0 58.8
Ties-Merging | 74.7 83.3 86.4 91.3 89.7 85.2 97.8 63.9
task-wise AdaMerging | 75.8 80.1 77.2 83.6 68.4 93.5 93.1 69.0
layer-wise AdaMerging | 78.1 90.7 90.8 96.5 94.8 97.5 98.6 81.3
WEMoE (Model Mixing) | 81.5 92.3 96.5 98.8 97.6 99.4 99.6 84.5
"""
TABLE_5_TASKS = ["sun397", "stanford-cars", "resisc45", "dtd", "svhn", "gtsrb", "avg", "mnist", "eurosat"]
TABLE_5 = """
Pre-trained | 63.2 59.9 60.6 43.9 23.5 30.4 46.9 47.6 45.6
Fisher Merging | 65.5 67.2 78.2 57.6 84.2 75.9 71.4 71.8 49.4
RegMean | 68.7 70.0 86.5 65.9 93.9 86.7 78.6 82.2 49.3
Task Arithmetic | 64.3 63.0 73.2 54.9 84.7 79.5 69.9 75.5 42.6
Ties-Merging | 68.3 65.5 76.9 54.9 75.4 72.0 68.9 73.1 47.3
AdaMerging | 68.4 71.9 87.9 69.1 92.2 93.8 80.5 77.7 47.3
WEMoE | 75.4 77.5 94.3 77.0 96.8 98.7 86.6 78.3 44.0
"""
TABLE_16_TASKS = ["sun397", "stanford-cars", "gtsrb", "eurosat", "dtd", "mnist", "avg", "resisc45", "svhn"]
TABLE_16 = """
Pre-trained | 63.2 59.9 30.4 45.6 43.9 47.6 48.4 60.6 23.5
Fisher Merging | 68.1 67.4 67.2 86.4 58.6 81.6 71.5 60.2 42.5
RegMean | 69.4 70.5 86.9 97.0 67.1 98.3 81.5 50.2 51.5
Task Arithmetic | 65.2 63.6 76.1 87.1 56.4 94.2 73.8 52.4 45.2
Ties-Merging | 68.2 65.9 70.0 81.2 56.0 89.0 71.7 60.3 47.3
AdaMerging | 69.8 72.4 95.5 95.1 70.7 98.1 83.6 48.7 60.7
WEMoE | 74.3 78.1 98.8 98.7 75.1 99.5 87.4 47.3 51.3
"""
TABLE_6_TASKS = ["stanford-cars", "eurosat", "resisc45", "gtsrb"]
TABLE_6_CLEAN = """
Fisher Merging | 66.0 92.7 83.7 78.7
RegMean | 72.1 97.5 88.9 93.9
Task Arithmetic | 64.6 91.8 80.2 74.8
Ties-Merging | 65.2 83.3 78.1 67.4
AdaMerging | 75.2 94.3 87.6 96.7
WEMoE | 77.4 98.9 94.4 99.0
"""
GPT2_TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"]
TABLE_12 = """
Fine-tuned (STL) | 76.8 82.1 80.4 88.3 89.6 65.3 91.2
Simple Average | 55.0 55.1 51.0 57.6 76.7 44.8 52.5
Fisher Merging | 54.8 58.0 39.5 63.3 81.5 49.1 64.7
RegMean | 61.7 70.4 65.4 69.7 78.8 56.0 79.7
Task Arithmetic | 68.7 68.6 69.6 70.5 81.8 47.3 83.6
Ties-Merging | 68.4 71.4 68.4 69.6 82.4 47.7 81.8
"""
TABLE_13 = """
Pre-trained | 69.1 56.5 76.2 88.4 82.1 80.1 91.2 62.2
Individual | 69.1 82.7 85.5 90.9 84.0 84.4 92.9 87.4
Weight Averaging | 69.7 59.7 78.9 90.1 83.8 80.5 91.2 72.0
Task Arithmetic | 68.8 55.2 78.7 89.8 83.7 79.1 91.5 72.4
Ties-Merging | 68.3 56.3 79.4 89.8 83.7 79.4 91.6 71.2
Layer-wise AdaMerging | 69.1 60.3 78.4 90.0 83.6 79.1 91.6 74.1
"""
TABLE_15 = """
Pre-trained | 73.7 56.6 82.4 91.1 85.5 85.6 94.3 87.5
Individual | 80.2 88.5 89.2 94.4 87.2 91.7 95.2 90.9
Weight Averaging | 74.6 84.3 84.1 92.8 86.3 87.4 94.8 88.0
Task Arithmetic | 76.9 85.4 85.3 93.9 85.8 88.1 95.2 87.8
Ties-Merging | 77.1 85.1 86.3 93.9 86.0 87.7 95.1 88.0
Layer-wise AdaMerging | 76.7 87.6 84.8 93.8 85.9 88.1 95.2 88.6
"""


# ----------------------------------------------------------------------------- NYUv2

# FusionBench's three NYUv2 tasks: (target column, primary metric, extra metrics). FusionBench trains its
# ResNet-50 experts itself (Lightning checkpoints, not on the hub) from torchvision's ImageNet ResNet-50:
# convert those, the torchvision base (task vectors are taken against it, so no other ResNet-50 will do)
# and its preprocessed NYUv2 arrays with `python -m harness.families.resnet_nyuv2` into the local paths
# below (README, NYUv2).
NYUV2_TASKS = {"segmentation": ("segmentation", "miou", ["pixel_accuracy"]),
               "depth": ("depth", "abs_err", ["rel_err"]),
               "normal": ("normal", "mean_angle", [])}
# Table 4, the diagonal of its single-task block (each expert on its own task) and the merged rows:
# mIoU, pixel accuracy, depth abs err, rel err, normal mean angle.
TABLE_4 = """
Fine-tuned (STL) | 52.0 73.8 42.5 17.7 24.7
Weight Averaging | 39.0 67.0 55.1 22.7 30.4
Task Arithmetic (lambda=0.3) | 33.6 63.3 56.3 23.2 31.3
Ties-Merging (lambda=0.3) | 36.3 61.7 60.5 24.5 33.1
"""


# Every copied table by the source its rows name, with its columns in the paper's order ('avg' where the
# paper states an average: Tables 5 and 16 average the six seen tasks, the columns before it). The paper's
# other tables' Avg. columns are not copied; tests/test_published_rows.py checks the stated ones.
NYUV2_COLUMNS = ["miou", "pixel_accuracy", "abs_err", "rel_err", "mean_angle"]
PAPER_TABLES = {
    "FusionBench Table 3": (PAPER_8, TABLE_3),
    "FusionBench Table 4": (NYUV2_COLUMNS, TABLE_4),
    "FusionBench Table 5": (TABLE_5_TASKS, TABLE_5),
    "FusionBench Table 6 (clean test set, lambda=0.3)": (TABLE_6_TASKS, TABLE_6_CLEAN),
    "FusionBench Table 12": (GPT2_TASKS, TABLE_12),
    "FusionBench Table 13": (list(GLUE), TABLE_13),
    "FusionBench Table 14": (PAPER_8, TABLE_14),
    "FusionBench Table 15": (list(GLUE), TABLE_15),
    "FusionBench Table 16": (TABLE_16_TASKS, TABLE_16),
}


def nyuv2_rows() -> list[dict]:
    out = []
    for row in rows("FusionBench Table 4", NYUV2_COLUMNS, TABLE_4):
        v = row["values"]
        out.append(row | {"values": {"segmentation": v["miou"], "depth": v["abs_err"], "normal": v["mean_angle"]},
                          "extra_values": {"segmentation": {"pixel_accuracy": v["pixel_accuracy"]},
                                           "depth": {"rel_err": v["rel_err"]}}})
    return out


def nyuv2_suite() -> dict:
    return {
        "name": "resnet50-nyuv2",
        "title": "ResNet-50 on NYUv2 scene understanding (segmentation, depth, normals)",
        "description": "FusionBench's dense-prediction setting: one dilated ResNet-50 expert per task, backbones "
                       "fused, each task keeps its own DeepLab head. Segmentation mIoU (pixel accuracy too), depth "
                       "absolute error x100 (relative error too), normals mean angle in degrees; errors are lower "
                       "is better, so the leaderboard ranks by the normalized score (% of STL).",
        "family": {"kind": "resnet_nyuv2", "base": "../models/resnet50-nyuv2/pretrained",
                   "experts": {t: f"../models/resnet50-nyuv2/{t}" for t in NYUV2_TASKS}},
        "tasks": [{"name": t, "dataset": "../data/nyuv2", "input_columns": ["image"], "label_column": column,
                   "split": "test", "validation_split": None, "metric": metric, "extra_metrics": extra}
                  for t, (column, metric, extra) in NYUV2_TASKS.items()],
        "references": {"computed": ["pretrained", "stl"], "published": nyuv2_rows()},
        "eval_batch_size": 16,
    }


def without_avg(row: dict) -> dict:
    row["values"].pop("avg", None)
    return row


# ----------------------------------------------------------------------------- all suites

def all_suites() -> list[dict]:
    suites = []
    for prefix in CLIP_BACKBONES:
        for set_name, tasks in CLIP_TASK_SETS.items():
            extra: dict = {}
            if set_name == "8tasks" and prefix == "clip-vit-b32":
                published = rows("FusionBench Table 3", PAPER_8, TABLE_3)
                published += [without_avg(r) for r in rows("FusionBench Table 5", TABLE_5_TASKS, TABLE_5,
                                                           split="exp1-table5")]
                published += [without_avg(r) for r in rows("FusionBench Table 16", TABLE_16_TASKS, TABLE_16,
                                                           split="exp2-table16")]
                extra = {"generalization": GENERALIZATION, "references": {"computed": ["pretrained", "stl"],
                                                                          "published": published}}
            elif set_name == "8tasks" and prefix == "clip-vit-l14":
                extra = {"references": {"computed": ["pretrained", "stl"],
                                        "published": rows("FusionBench Table 14", PAPER_8, TABLE_14)}}
            suites.append(clip_suite(prefix, set_name, tasks, **extra))
    suites.append(clip_suite(
        "clip-vit-b32", "robustness", ROBUSTNESS_TASKS,
        corruptions=[{"name": c, "severity": 3} for c in CORRUPTIONS],
        references={"computed": ["pretrained", "stl"],
                    "published": rows("FusionBench Table 6 (clean test set, lambda=0.3)", TABLE_6_TASKS,
                                      TABLE_6_CLEAN)}))
    suites[-1]["description"] += (" Robustness: the seven corruptions applied by fbh (harness/corruptions.py) "
                                  "to the clean test sets at severity 3.")
    suites += [openclip_suite(prefix) for prefix in OPENCLIP_BACKBONES]
    suites.append({
        "name": "gpt2-glue",
        "title": "GPT-2 on seven GLUE tasks (sequence classification)",
        "description": "FusionBench's tanganke/gpt2_<task> classifiers: the GPT-2 body is fused, each task keeps "
                       "its own classification head; accuracy on GLUE validation.",
        "family": {"kind": "gpt2_classification", "base": "gpt2",
                   "experts": {t: f"tanganke/gpt2_{t}" for t in GPT2_TASKS}},
        "tasks": [glue_task(t) for t in GPT2_TASKS],
        "references": {"computed": ["stl"], "published": rows("FusionBench Table 12", GPT2_TASKS, TABLE_12)},
        "eval_batch_size": 64,
    })
    for size, lora, table in [("base", False, None), ("base", True, ("FusionBench Table 13", TABLE_13)),
                              ("large", True, ("FusionBench Table 15", TABLE_15))]:
        suite = flan_t5_suite(size, lora)
        suite["references"] = {"computed": ["pretrained", "stl"],
                               "published": rows(table[0], list(GLUE), table[1]) if table else []}
        suites.append(suite)
    suites.append(nyuv2_suite())
    return suites


def write_all(out: Path) -> list[Path]:
    header = ("# Generated by `python -m harness.families.catalog` from FusionBench's ids, class names and\n"
              "# templates (fusion-bench, MIT licence) and the paper's tables; regenerate rather than edit.\n")
    paths = []
    for suite in all_suites():
        path = out / f"{suite['name']}.yaml"
        path.write_text(header + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True, width=120))
        paths.append(path)
    return paths


def download_commands(suite_file: Path) -> list[str]:
    """`hf download` lines that put a suite's models and datasets into the HF cache."""
    from harness.spec import load_suite
    suite = load_suite(suite_file)
    on_hub = lambda ref: not ref.startswith(("./", "../", "/"))  # noqa: E731 -- local files are the user's
    models = dict.fromkeys(r for r in [suite.family.base, *suite.family.experts.values()] if on_hub(r))
    datasets = dict.fromkeys(t.dataset for t in suite.tasks)
    return ([f"hf download {m}" for m in models]
            + [f"hf download --repo-type dataset {d}" for d in datasets])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--downloads"]:  # python -m harness.families.catalog --downloads suites/X.yaml
        print("\n".join(download_commands(Path(sys.argv[2]))))
    else:
        for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "suites")):
            print(p)
