"""FusionBench's real suites, as data: hub ids, datasets, class names, prompt templates and
the paper's published rows. `python -m harness.families.catalog [DIR]` writes suites/*.yaml.

Model and dataset ids, CLIP class names and templates, and the Flan-T5 GLUE prompt templates
are copied from the fusion-bench package (MIT licence, (c) Anke Tang et al.); published rows
from the FusionBench paper (arXiv:2406.03280), each with its table number.
"""

from __future__ import annotations

import csv
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


SUITES = Path(__file__).resolve().parents[2] / "suites"
CLIP_TASK_DIR = "_include/clip-tasks"  # one file per CLIP task, included by every suite that evaluates it
PAPER_DIR = SUITES / "_paper"          # the paper's tables, one CSV each


def clip_task_include(name: str) -> dict:
    return {"include": f"{CLIP_TASK_DIR}/{name}.yaml"}


def clip_task(name: str) -> dict:
    """A CLIP task's fields as its include file holds them."""
    return yaml.safe_load((SUITES / CLIP_TASK_DIR / f"{name}.yaml").read_text())


def clip_classes_and_templates(task: str) -> tuple[list[str], list[str]]:
    """From fusion_bench.tasks.clip_classification: templates are lambdas; calling them with
    '{c}' turns each back into the string form the suite stores."""
    import importlib
    mod = importlib.import_module(f"fusion_bench.tasks.clip_classification.{TEMPLATE_MODULE.get(task, task)}")
    classes = list(getattr(mod, "classnames", None) or getattr(mod, "fine_label"))
    templates = [t("{c}") for t in mod.templates]
    assert all(t.count("{c}") == 1 for t in templates), task
    return classes, templates


def clip_task_from_fusion_bench(name: str) -> dict:
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
        "tasks": [clip_task_include(t) for t in tasks],
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
        "tasks": [clip_task_include(t) for t in tasks],
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

def rows(source: str, tolerance: float = 0.5, **extra) -> list[dict]:
    """The published rows of one of the paper's tables (PAPER_TABLES), values keyed by its columns."""
    columns, lines = PAPER_TABLES[source]
    return [{"label": label, "source": source, "tolerance": tolerance, "values": dict(zip(columns, nums)), **extra}
            for label, nums in lines]


def read_table(path: Path) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """(columns, [(row label, values)]) of a copied table: a CSV whose header is 'label' then the paper's
    columns in its order; a row with a column too many or too few is refused (it would shift every value)."""
    with path.open(newline="") as f:
        header, *body = list(csv.reader(f))
    columns = header[1:]
    lines = []
    for label, *values in body:
        if len(values) != len(columns):
            raise ValueError(f"{path.name}, row '{label}': {len(values)} values for {len(columns)} columns {columns}")
        lines.append((label, [float(v) for v in values]))
    return columns, lines


# Every copied table by the source its rows name ('avg' where the paper states an average: Tables 5 and 16
# average the six seen tasks, the columns before it). The paper's other tables' Avg. columns are not
# copied; tests/test_published_rows.py checks the stated ones.
PAPER_TABLE_FILES = {
    "FusionBench Table 3": "table-3.csv",
    "FusionBench Table 4": "table-4.csv",
    "FusionBench Table 5": "table-5.csv",
    "FusionBench Table 6 (clean test set, lambda=0.3)": "table-6-clean.csv",
    "FusionBench Table 12": "table-12.csv",
    "FusionBench Table 13": "table-13.csv",
    "FusionBench Table 14": "table-14.csv",
    "FusionBench Table 15": "table-15.csv",
    "FusionBench Table 16": "table-16.csv",
}
PAPER_TABLES = {source: read_table(PAPER_DIR / name) for source, name in PAPER_TABLE_FILES.items()}
GPT2_TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"]


# ----------------------------------------------------------------------------- NYUv2

# FusionBench's three NYUv2 tasks: (target column, primary metric, extra metrics). FusionBench trains its
# ResNet-50 experts itself (Lightning checkpoints, not on the hub) from torchvision's ImageNet ResNet-50:
# convert those, the torchvision base (task vectors are taken against it, so no other ResNet-50 will do)
# and its preprocessed NYUv2 arrays with `python -m harness.families.resnet_nyuv2` into the local paths
# below (README, NYUv2).
NYUV2_TASKS = {"segmentation": ("segmentation", "miou", ["pixel_accuracy"]),
               "depth": ("depth", "abs_err", ["rel_err"]),
               "normal": ("normal", "mean_angle", [])}
# Table 4's rows are the diagonal of its single-task block (each expert on its own task) and the merged
# rows: mIoU, pixel accuracy, depth abs err, rel err, normal mean angle.


def nyuv2_rows() -> list[dict]:
    out = []
    for row in rows("FusionBench Table 4"):
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
                published = rows("FusionBench Table 3")
                published += [without_avg(r) for r in rows("FusionBench Table 5", split="exp1-table5")]
                published += [without_avg(r) for r in rows("FusionBench Table 16", split="exp2-table16")]
                extra = {"generalization": GENERALIZATION, "references": {"computed": ["pretrained", "stl"],
                                                                          "published": published}}
            elif set_name == "8tasks" and prefix == "clip-vit-l14":
                extra = {"references": {"computed": ["pretrained", "stl"],
                                        "published": rows("FusionBench Table 14")}}
            suites.append(clip_suite(prefix, set_name, tasks, **extra))
    suites.append(clip_suite(
        "clip-vit-b32", "robustness", ROBUSTNESS_TASKS,
        corruptions=[{"name": c, "severity": 3} for c in CORRUPTIONS],
        references={"computed": ["pretrained", "stl"],
                    "published": rows("FusionBench Table 6 (clean test set, lambda=0.3)")}))
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
        "references": {"computed": ["stl"], "published": rows("FusionBench Table 12")},
        "eval_batch_size": 64,
    })
    for size, lora, table in [("base", False, None), ("base", True, "FusionBench Table 13"),
                              ("large", True, "FusionBench Table 15")]:
        suite = flan_t5_suite(size, lora)
        suite["references"] = {"computed": ["pretrained", "stl"], "published": rows(table) if table else []}
        suites.append(suite)
    suites.append(nyuv2_suite())
    return suites


def write_all(out: Path) -> list[Path]:
    """Write every suite file into `out`; the CLIP task files they include are written beside them from
    fusion-bench when it is installed, else copied from this checkout's."""
    header = ("# Generated by `python -m harness.families.catalog` from FusionBench's ids, class names and\n"
              "# templates (fusion-bench, MIT licence) and the paper's tables (suites/_paper/); regenerate rather\n"
              "# than edit.\n")
    paths = write_clip_tasks(out)
    for suite in all_suites():
        path = out / f"{suite['name']}.yaml"
        path.write_text(header + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True, width=120))
        paths.append(path)
    return paths


def write_clip_tasks(out: Path) -> list[Path]:
    import importlib.util
    # an imported fusion_bench may carry no __spec__ (find_spec then raises), so look in sys.modules first
    from_fusion_bench = "fusion_bench" in sys.modules or importlib.util.find_spec("fusion_bench") is not None
    folder = out / CLIP_TASK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CLIP_DATASETS:
        task = clip_task_from_fusion_bench(name) if from_fusion_bench else clip_task(name)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True, width=120))
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
