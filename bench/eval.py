"""Evaluation throughput: fbh's cached-tensor batched evaluation vs FusionBench's CLIP task-pool loop.

    FBH_CACHE=/tmp/fbhcache python bench/eval.py [--suite tiny-vision] [--repeat 3]

Same model (the suite's pre-trained vision encoder), same heads, same test sets, same
batch size, one process, 2 torch threads.

- fbh: family.eval_data(task, 'test') (the preprocessed tensors, read from the cache on
  disk each time) + harness.evaluate.predict (batched forward + head) + family.score.
- fusion-bench: what CLIPVisionModelTaskPool does per test set, minus its progress bar:
  fusion_bench.dataset.ImageClassificationDataset(dataset, processor) (per-sample
  PIL -> processor) in a torch DataLoader (num_workers=0: this machine has 2 cores), the
  model forward with the same fixed head for logits, and torchmetrics accuracy + mean
  cross-entropy updated per batch, as its _evaluate does. (Its task pool itself needs a
  CLIP text tower for zero-shot heads, which tiny-vision's vision-only zoo has not; the
  head computation is the same function on both sides.)
Both sides' accuracies are printed and must agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="tiny-vision")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over every test set (fastest reported)")
    args = ap.parse_args()

    import harness  # noqa: F401  (first, as in `fbh`: its OpenMP setting applies to both sides of this process)
    import torch
    import torch.nn.functional as F
    from fusion_bench.dataset import ImageClassificationDataset
    from torch.utils.data import DataLoader
    from torchmetrics import Accuracy, MeanMetric

    from harness import runner
    from harness.evaluate import as_predictor, predict

    handle = runner.open_suite(args.suite, torch.device("cpu"), progress=lambda _: None)
    family, spec = handle.family, handle.spec
    model = family.build(family.base_state())
    predictor = as_predictor(model, family)
    bs = spec.eval_batch_size
    tasks = spec.task_names
    print(machine())
    print(f"suite {args.suite}: {len(tasks)} test sets, batch size {bs}, pre-trained model")

    def fbh_pass():
        correct = n = 0
        for t in tasks:
            inputs, labels = family.eval_data(t, spec.task(t).split)
            per_example = family.score(t, predict(predictor, family, t, inputs, bs), labels)
            correct += float(per_example.sum())
            n += len(per_example)
        return n, correct / n

    def fusion_bench_pass():
        correct = n = 0
        for t in tasks:
            ds = family._raw_split(t, spec.task(t).split)
            loader = DataLoader(ImageClassificationDataset(ds, family.processor()), batch_size=bs, num_workers=0)
            acc = Accuracy(task="multiclass", num_classes=family.num_classes(t))
            loss_metric = MeanMetric()
            with torch.no_grad():
                for inputs, targets in loader:
                    logits = family.logits(model, t, inputs)
                    loss_metric.update(F.cross_entropy(logits, targets).cpu())
                    acc.update(logits.cpu(), targets.cpu())
            correct += float(acc.compute()) * len(ds)
            n += len(ds)
        return n, correct / n

    results = {}
    for name, fn in [("fbh", fbh_pass), ("fusion-bench", fusion_bench_pass)]:
        fn()  # warm-up: fills fbh's tensor cache if it is cold, loads datasets, first-call costs
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n, accuracy = fn()
            times.append(time.perf_counter() - t0)
        results[name] = (min(times), n, accuracy)
        print(f"{name:13s} {n} images in {min(times):7.3f} s = {n / min(times):9.0f} images/s   "
              f"mean accuracy {100 * accuracy:.2f}%", flush=True)
    fbh_s, fb_s = results["fbh"][0], results["fusion-bench"][0]
    print(f"throughput ratio fbh / fusion-bench: {fb_s / fbh_s:.1f}x")
    assert abs(results["fbh"][2] - results["fusion-bench"][2]) < 1e-6, "the two pipelines disagree on accuracy"


if __name__ == "__main__":
    main()
