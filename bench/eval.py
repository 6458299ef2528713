"""Evaluation throughput: fbh's cached-tensor batched evaluation vs FusionBench's CLIP task-pool loop.

    FBH_CACHE=/tmp/fbhcache python bench/eval.py [--suite tiny-vision] [--repeat 3]
    python bench/eval.py --synthetic vit-b32 --device cuda --precision float32,bfloat16,float16 --fb-workers 8

Same model (the suite's pre-trained vision encoder), same heads, same test sets, same
batch size, one process (plus FusionBench's data-loader workers, --fb-workers).

- fbh: family.eval_data(task, 'test') (the preprocessed tensors, read from the cache on
  disk each time) + harness.evaluate.predict (batched forward + head) + family.score, at
  each --precision (the suite's precision field: the model held and run in that dtype).
- fusion-bench: what CLIPVisionModelTaskPool does per test set, minus its progress bar:
  fusion_bench.dataset.ImageClassificationDataset(dataset, processor) (per-sample
  PIL -> processor) in a torch DataLoader, the float32 model forward with the same fixed
  head for logits, and torchmetrics accuracy + mean cross-entropy updated per batch, as its
  _evaluate does. (Its task pool itself needs a CLIP text tower for zero-shot heads, which
  tiny-vision's vision-only zoo has not; the head computation is the same function on both
  sides.) FusionBench's CLIP task pools use 16 loader workers; --fb-workers sets them.
Both sides' float32 accuracies are printed and must agree.

--synthetic vit-b32 makes, in a temporary folder, a suite of CLIP-ViT-B/32's vision shape
(random weights, saved with save_pretrained), its CLIP image processor (224 px crops) and
two test sets of random 256x256 images (datasets on disk), --images each; the timing then
measures a real model size, where the dtype matters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, make_checkpoints  # noqa: E402


def synthetic_suite(size: str, root: Path, images: int) -> str:
    """A suite of the given vision size over random weights and random images; returns its name."""
    import datasets
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor
    base, _ = make_checkpoints(size, 0, root)
    config = json.loads((base / "config.json").read_text())
    side = config["image_size"]  # 224 for ViT-B/32: CLIP's resize + centre crop and normalisation
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(base)
    hidden = config["hidden_size"]
    g = torch.Generator().manual_seed(0)
    tasks = {"task_a": 10, "task_b": 37}
    save_file({t: torch.nn.functional.normalize(torch.randn(c, hidden, generator=g), dim=-1)
               for t, c in tasks.items()}, str(root / "heads.safetensors"))
    rng = np.random.default_rng(0)
    for t, classes in tasks.items():
        if (root / "data" / t).is_dir():
            continue
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(num_classes=classes)})
        pictures = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(images)]
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"image": pictures, "label": [i % classes for i in range(images)]}, features=features)}
        ).save_to_disk(str(root / "data" / t))
    name = f"synthetic-{size}"
    (root / "suites").mkdir(exist_ok=True)
    (root / "suites" / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "family": {"kind": "clip_vision", "base": str(base), "heads": str(root / "heads.safetensors"),
                                 "experts": {t: str(base) for t in tasks}},
        "tasks": [{"name": t, "dataset": str(root / "data" / t)} for t in tasks], "eval_batch_size": 128}))
    os.environ["FBH_SUITES_DIR"] = str(root / "suites")
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="tiny-vision")
    ap.add_argument("--synthetic", choices=["tiny", "vit-b32"], help="a made-up suite of this model size instead")
    ap.add_argument("--images", type=int, default=1024, help="test images per task of --synthetic")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fbh-bench-eval")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over every test set (fastest reported)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", default="float32", help="fbh's precisions to time, comma-separated")
    ap.add_argument("--fb-workers", type=int, default=0, help="FusionBench's DataLoader workers")
    args = ap.parse_args()

    suite = synthetic_suite(args.synthetic, args.workdir / args.synthetic, args.images) if args.synthetic \
        else args.suite
    import harness  # noqa: F401  (first, as in `fbh`: its OpenMP setting applies to both sides of this process)
    import torch
    import torch.nn.functional as F
    from fusion_bench.dataset import ImageClassificationDataset
    from torch.utils.data import DataLoader
    from torchmetrics import Accuracy, MeanMetric

    from harness import runner
    from harness.evaluate import as_predictor, predict
    from harness.families import load_family

    device = torch.device(args.device)
    handle = runner.open_suite(suite, device, progress=lambda _: None)
    spec = handle.spec
    tasks = spec.task_names
    bs = spec.eval_batch_size
    print(machine() + (f" | {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fbh_pass(family, predictor):
        def run():
            correct = n = 0
            for t in tasks:
                inputs, labels = family.eval_data(t, spec.task(t).split)
                per_example = family.score(t, predict(predictor, family, t, inputs, bs), labels)
                correct += float(per_example.sum())
                n += len(per_example)
            sync()
            return n, correct / n
        return run

    family = handle.family
    model = family.build(family.base_state())
    print(f"suite {suite}: {len(tasks)} test sets, batch size {bs}, pre-trained model on {args.device}")

    def fusion_bench_pass():
        correct = n = 0
        for t in tasks:
            ds = family._raw_split(t, spec.task(t).split)
            loader = DataLoader(ImageClassificationDataset(ds, family.processor()), batch_size=bs,
                                num_workers=args.fb_workers)
            acc = Accuracy(task="multiclass", num_classes=family.num_classes(t))
            loss_metric = MeanMetric()
            with torch.no_grad():
                for inputs, targets in loader:
                    logits = family.logits(model, t, inputs)
                    loss_metric.update(F.cross_entropy(logits, targets.to(logits.device)).cpu())
                    acc.update(logits.cpu(), targets.cpu())
            correct += float(acc.compute()) * len(ds)
            n += len(ds)
        sync()
        return n, correct / n

    sides = [("fusion-bench float32", fusion_bench_pass)]
    for precision in args.precision.split(","):
        fam = load_family(spec.model_copy(update={"precision": precision}), handle.file, handle.zoo_dir, device)
        sides.append((f"fbh {precision}", fbh_pass(fam, as_predictor(fam.build(fam.base_state()), fam))))

    results = {}
    for name, fn in sides:
        fn()  # warm-up: fills fbh's tensor cache if it is cold, loads datasets, first-call costs
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n, accuracy = fn()
            times.append(time.perf_counter() - t0)
        results[name] = (min(times), n, accuracy)
        print(f"{name:22s} {n} images in {min(times):7.3f} s = {n / min(times):9.0f} images/s   "
              f"mean accuracy {100 * accuracy:.2f}%", flush=True)
    fb_s = results["fusion-bench float32"][0]
    for name, (seconds, _, _) in results.items():
        if name.startswith("fbh"):
            print(f"throughput ratio {name} / fusion-bench float32: {fb_s / seconds:.1f}x")
    if "fbh float32" in results:
        assert abs(results["fbh float32"][2] - results["fusion-bench float32"][2]) < 1e-6, \
            "the two float32 pipelines disagree on accuracy"


if __name__ == "__main__":
    main()
