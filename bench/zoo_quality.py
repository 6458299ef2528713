"""Zoo quality table: can a suite's zoo tell fusion methods apart?

Builds the suite's zoo if needed (timed), then prints mean and per-task test accuracy for
the pre-trained model, STL (each expert on its own task), MTL, simple average, task
arithmetic, TIES and the simple ensemble, plus the mean |cosine| between task vectors.

    PYTHONPATH=$PWD FBH_CACHE=/tmp/fbhcache python bench/zoo_quality.py [suites/tiny-vision.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from harness import registry
from harness.api import FusionContext
from harness.evaluate import as_predictor, evaluate
from harness.families import load_family
from harness.spec import load_suite
from harness.zoo import build_report, ensure_built

METHODS = [
    ("simple_average", {}),
    ("task_arithmetic", {"scaling_factor": 0.3}),
    ("task_arithmetic", {"scaling_factor": 0.2}),
    ("ties_merging", {"scaling_factor": 0.5}),
    ("ties_merging", {"scaling_factor": 1.0}),
    ("simple_ensemble", {}),
]


def main(argv: list[str]) -> None:
    suite_file = Path(argv[0]) if argv else Path("suites/tiny-vision.yaml")
    suite = load_suite(suite_file)
    t0 = time.time()
    zoo = ensure_built(suite.family.zoo.builder, suite.family.zoo.recipe, progress=print)
    print(f"zoo {zoo} (ensure_built {time.time() - t0:.1f}s, "
          f"build report {build_report(zoo)['report']['seconds']}s)")
    fam = load_family(suite, suite_file, zoo, torch.device("cpu"))
    tasks = [(t, "seen") for t in suite.task_names]
    res: dict[str, list] = {}
    t1 = time.time()
    res["pretrained"] = evaluate(as_predictor(fam.base_state(), fam), fam, tasks)
    one_model_s = time.time() - t1
    res["STL"] = [row for t in suite.task_names
                  for row in evaluate(as_predictor(fam.expert_state(t), fam), fam, [(t, "seen")])]
    if suite.references.mtl:
        res["MTL"] = evaluate(as_predictor(fam.load_state(suite.references.mtl, "mtl"), fam), fam, tasks)
    ctx = FusionContext(tasks=suite.task_names, load_base=fam.base_state, load_expert=fam.expert_state,
                        build_module=fam.build)
    for name, params in METHODS:
        info = registry.get(name)
        fused = info.fn(ctx, info.validate_params(params))
        label = name + "".join(f" {k.split('_')[0]}={v}" for k, v in params.items())
        res[label] = evaluate(as_predictor(fused, fam), fam, tasks)
    print(f"{'model':28s} {'mean':>6s} | " + " ".join(f"{t[:6]:>6s}" for t in suite.task_names))
    for label, rows in res.items():
        mean = sum(r.value for r in rows) / len(rows)
        print(f"{label:28s} {mean:6.1f} | " + " ".join(f"{r.value:6.1f}" for r in rows))
    flat = torch.stack([torch.cat([v.flatten() for v in tv.values()]) for tv in ctx.task_vectors()])
    cos = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    n = len(flat)
    print(f"mean |cos| between task vectors {((cos.abs().sum() - n) / (n * (n - 1))).item():.3f}; "
          f"task-vector norms {[round(x, 2) for x in flat.norm(dim=1).tolist()]}")
    print(f"one model on {len(tasks)} test sets: {one_model_s:.2f}s; whole table {time.time() - t1:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
