"""Zoo quality: does a suite's zoo tell fusion methods apart, the way CLIP's does, on every seed?

For each recipe seed, builds the suite's zoo with that seed (timed; a finished build is reused),
then measures mean and per-task test accuracy of the pre-trained model, STL (each expert on its
own task), MTL, and, through the registry at the shipped submissions' settings, simple average,
task arithmetic, TIES, the simple ensemble, layer-wise AdaMerging and WEMoE (their fusion time
too). Also the Spearman correlation between mean prediction entropy and mean accuracy over a
sweep of >= 40 merged models (task arithmetic and TIES over scaling factors and subsets of the
experts), whether each task's own expert is its lowest-entropy expert, and how much each expert
changes entropy on its own task and on each other task (why merges can look less confident). Prints one table
per seed, one across seeds (mean, max-min) and the pass/fail of each of issue #16's bars.

    PYTHONPATH=$PWD FBH_CACHE=/tmp/fbhcache python bench/zoo_quality.py --seeds 0 1 2 [--quick]

--quick runs the adaptive methods for a fifth of their submission steps (labelled so) and
the entropy sweep on the first 200 test inputs per task: for iteration, not for the table.
--set KEY=VALUE overrides a recipe key (a JSON value) for every seed, to try recipes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from harness import registry
from harness.api import FusionContext
from harness.evaluate import as_predictor, evaluate
from harness.families import load_family
from harness.runner import fuse
from harness.spec import load_submission, load_suite
from harness.zoo import build_report, ensure_built

REPO = Path(__file__).resolve().parent.parent
DATA_FREE = ["simple_average", "task_arithmetic", "ties_merging"]
METHODS = ["simple_average", "task_arithmetic", "ties_merging", "simple_ensemble", "adamerging_layerwise", "we_moe"]
SUBMISSION_FILES = {"simple_average": "simple_average.yaml", "task_arithmetic": "task_arithmetic.yaml",
                    "ties_merging": "ties_merging.yaml", "simple_ensemble": "simple_ensemble.yaml",
                    "adamerging_layerwise": "adamerging_layerwise.yaml", "we_moe": "we_moe.yaml"}
STEP_KEY = {"adamerging_layerwise": "max_steps", "we_moe": "max_steps"}
BUDGET_S = 900.0


def submission_params(method: str, quick: bool) -> dict:
    sub = load_submission(REPO / "submissions" / SUBMISSION_FILES[method])
    params = dict(sub.params)
    if quick and method in STEP_KEY:
        params[STEP_KEY[method]] = max(1, params.get(STEP_KEY[method], 0) // 5)
    return params


def context(fam, tasks, seed=0) -> FusionContext:
    def data(task: str, split: str):
        return fam.eval_data(task, {"train": "train", "validation": "validation", "test": "test"}[split])
    return FusionContext(tasks=tasks, load_base=fam.base_state, load_expert=fam.expert_state,
                         build_module=fam.build, logits_fn=fam.logits, data_fn=data,
                         data_access="unlabeled_test", seed=seed)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


@torch.no_grad()
def entropy_and_accuracy(fam, model, tasks, limit: int | None) -> tuple[list[float], list[float]]:
    """Per task: mean prediction entropy and accuracy (%) on the first `limit` test inputs."""
    ents, accs = [], []
    for t in tasks:
        x, y = fam.eval_data(t, "test")
        x, y = x[:limit], y[:limit]
        logits = torch.cat([fam.logits(model, t, xb) for xb in x.split(500)])
        logp = logits.log_softmax(-1)
        ents.append(float(-(logp.exp() * logp).sum(-1).mean()))
        accs.append(float((logits.argmax(-1) == y).float().mean() * 100))
    return ents, accs


def spearman(a, b) -> float:
    ra, rb = (torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def entropy_sweep(fam, ctx, tasks, limit) -> dict:
    """>= 40 merged models: task arithmetic over 10 scaling factors, TIES over 6, and task
    arithmetic (0.3) and TIES (1.0) on 12 seeded subsets of 2-6 experts each; all scored on every task."""
    ta, ties = registry.get("task_arithmetic"), registry.get("ties_merging")
    models = [(ta, {"scaling_factor": s}, tasks) for s in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3)]
    models += [(ties, {"scaling_factor": s, "top_k": 0.2}, tasks) for s in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)]
    rng = random.Random(0)
    for _ in range(12):
        subset = sorted(rng.sample(tasks, rng.randint(2, 6)), key=tasks.index)
        models += [(ta, {"scaling_factor": 0.3}, subset), (ties, {"scaling_factor": 1.0, "top_k": 0.2}, subset)]
    ents, accs = [], []
    for info, params, subset in models:
        sub_ctx = FusionContext(tasks=subset, load_base=ctx.load_base, load_expert=ctx.expert, build_module=fam.build)
        sub_ctx._cache["base"] = ctx.base
        state = info.fn(sub_ctx, info.validate_params(params))
        e, a = entropy_and_accuracy(fam, fam.build(state), tasks, limit)
        ents.append(mean(e))
        accs.append(mean(a))
    # Each task's own expert should be the most confident of the experts on that task.
    own_lowest = {}
    expert_ent = {}
    for t in tasks:
        expert_ent[t] = entropy_and_accuracy(fam, fam.build(ctx.expert(t)), tasks, limit)[0]
    for i, t in enumerate(tasks):
        own_lowest[t] = min(tasks, key=lambda e: expert_ent[e][i]) == t
    # Why merges can look less confident than the base: each expert lowers entropy on its own task
    # but raises it a little on every other; a merge of n experts adds n-1 such rises per task.
    base_ent = entropy_and_accuracy(fam, fam.build(ctx.base), tasks, limit)[0]
    own_shift = mean(expert_ent[t][i] - base_ent[i] for i, t in enumerate(tasks))
    cross_shift = mean(expert_ent[e][i] - base_ent[i] for i, t in enumerate(tasks) for e in tasks if e != t)
    points = [(info.name, params.get("scaling_factor"), len(subset), round(e, 3), round(a, 1))
              for (info, params, subset), e, a in zip(models, ents, accs)]
    return {"n": len(models), "spearman": spearman(ents, accs), "own_lowest": own_lowest, "points": points,
            "acc_range": (min(accs), max(accs)), "own_shift": own_shift, "cross_shift": cross_shift}


def run_seed(suite_file: Path, seed: int, overrides: dict, quick: bool, skip_adaptive: bool) -> dict:
    suite = load_suite(suite_file)
    recipe = dict(suite.family.zoo.recipe) | overrides | {"seed": seed}
    t0 = time.time()
    zoo = ensure_built(suite.family.zoo.builder, recipe, progress=lambda m: print(f"  [seed {seed}] {m}", flush=True))
    report = build_report(zoo)
    fam = load_family(suite, suite_file, zoo, torch.device("cpu"))
    tasks = suite.task_names
    rows, times = {}, {}
    seen = [(t, "seen") for t in tasks]
    acc = lambda res: [r.value for r in res]  # noqa: E731
    rows["pretrained"] = acc(evaluate(as_predictor(fam.base_state(), fam), fam, seen))
    rows["STL"] = [evaluate(as_predictor(fam.expert_state(t), fam), fam, [(t, "seen")])[0].value for t in tasks]
    if suite.references.mtl:
        rows["MTL"] = acc(evaluate(as_predictor(fam.load_state(suite.references.mtl, "mtl"), fam), fam, seen))
    for name in METHODS:
        if skip_adaptive and name in STEP_KEY:
            continue
        info = registry.get(name)
        params = info.validate_params(submission_params(name, quick))
        ctx = context(fam, tasks)
        t1 = time.time()
        fused = fuse(info, ctx, params)
        times[name] = time.time() - t1
        rows[name] = acc(evaluate(as_predictor(fused, fam), fam, seen))
    t2 = time.time()
    sweep = entropy_sweep(fam, context(fam, tasks), tasks, 200 if quick else None)
    return {"seed": seed, "zoo": zoo.name, "digest": report["digest"], "build_s": report["report"]["seconds"],
            "ensure_s": round(time.time() - t0, 1), "rows": rows, "times": times, "sweep": sweep,
            "sweep_s": time.time() - t2, "tasks": tasks, "scale": read_scale(zoo)}


def read_scale(zoo: Path) -> float:
    from safetensors import safe_open
    with safe_open(str(zoo / "heads.safetensors"), "pt") as f:
        return float((f.metadata() or {}).get("logit_scale", "nan"))


def print_seed(r: dict) -> None:
    tasks = r["tasks"]
    print(f"\n== seed {r['seed']}: zoo {r['zoo']} ({r['digest'][:19]}...), cold build {r['build_s']}s, "
          f"logit scale {r['scale']:g}")
    print(f"{'model':22s} {'mean':>6s} | " + " ".join(f"{t[:6]:>6s}" for t in tasks) + " | fuse s")
    for label, vals in r["rows"].items():
        t = f"{r['times'][label]:6.1f}" if label in r["times"] else ""
        print(f"{label:22s} {mean(vals):6.1f} | " + " ".join(f"{v:6.1f}" for v in vals) + f" | {t}")
    s = r["sweep"]
    bad = [t for t, ok in s["own_lowest"].items() if not ok]
    print(f"entropy-accuracy Spearman over {s['n']} merged models: {s['spearman']:+.2f} "
          f"(accuracy {s['acc_range'][0]:.1f}-{s['acc_range'][1]:.1f}); own expert lowest-entropy on "
          f"{len(tasks) - len(bad)}/{len(tasks)} tasks{' (not: ' + ', '.join(bad) + ')' if bad else ''}")
    print(f"entropy of each expert minus the pre-trained model's: {s['own_shift']:+.3f} on its own task, "
          f"{s['cross_shift']:+.3f} on each other task ({len(tasks) - 1} others: "
          f"{(len(tasks) - 1) * s['cross_shift']:+.3f})")


def bars(results: list[dict], quick: bool) -> list[tuple[str, bool, str]]:
    out = []
    def m(r, k):
        return mean(r["rows"][k]) if k in r["rows"] else float("nan")
    for r in results:
        s = r["seed"]
        pre, ta, ties, avg = m(r, "pretrained"), m(r, "task_arithmetic"), m(r, "ties_merging"), m(r, "simple_average")
        best_df = max(avg, ta, ties)
        stl, mtl = m(r, "STL"), m(r, "MTL")
        out += [(f"seed {s}: TIES >= pretrained + 10", ties >= pre + 10, f"{ties:.1f} vs {pre + 10:.1f}"),
                (f"seed {s}: TA 0.3 >= pretrained + 6", ta >= pre + 6, f"{ta:.1f} vs {pre + 6:.1f}"),
                (f"seed {s}: simple average > pretrained", avg > pre, f"{avg:.1f} vs {pre:.1f}"),
                (f"seed {s}: STL >= best data-free merge + 10", stl >= best_df + 10, f"{stl:.1f} vs {best_df + 10:.1f}"),
                (f"seed {s}: best data-free merge <= MTL <= STL", best_df <= mtl <= stl,
                 f"{best_df:.1f} <= {mtl:.1f} <= {stl:.1f}")]
        if "adamerging_layerwise" in r["rows"]:
            ada, wem = m(r, "adamerging_layerwise"), m(r, "we_moe")
            out += [(f"seed {s}: layer-wise AdaMerging >= TA + 3", ada >= ta + 3, f"{ada:.1f} vs {ta + 3:.1f}"),
                    (f"seed {s}: WEMoE >= TIES + 3", wem >= ties + 3, f"{wem:.1f} vs {ties + 3:.1f}")]
            for k in STEP_KEY:
                t = r["times"][k] * (1 if not quick else 5)
                out.append((f"seed {s}: {k} fusion within {BUDGET_S:g} s", t <= BUDGET_S,
                            f"{t:.0f} s{' (x5 of the quick run)' if quick else ''}"))
        sw = r["sweep"]
        out += [(f"seed {s}: entropy-accuracy Spearman <= -0.7 ({sw['n']} models)", sw["spearman"] <= -0.7,
                 f"{sw['spearman']:+.2f}"),
                (f"seed {s}: own expert lowest-entropy on every task", all(sw["own_lowest"].values()),
                 f"{sum(sw['own_lowest'].values())}/{len(sw['own_lowest'])}"),
                (f"seed {s}: cold build <= 180 s", r["build_s"] <= 180, f"{r['build_s']} s")]
    if len(results) > 1:
        for k in results[0]["rows"]:
            vals = [mean(r["rows"][k]) for r in results if k in r["rows"]]
            out.append((f"{k}: max-min across seeds <= 2", max(vals) - min(vals) <= 2,
                        f"{max(vals) - min(vals):.1f}"))
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", nargs="?", default=str(REPO / "suites" / "tiny-vision.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-adaptive", action="store_true", help="leave out AdaMerging and WEMoE")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (JSON value)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except ValueError:
            overrides[k] = v
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    results = []
    for seed in a.seeds:
        r = run_seed(Path(a.suite), seed, overrides, a.quick, a.skip_adaptive)
        print_seed(r)
        results.append(r)
    if len(results) > 1:
        print(f"\n== across seeds {a.seeds}: mean (max-min)")
        tasks = results[0]["tasks"]
        print(f"{'model':22s} {'mean':>12s} | " + " ".join(f"{t[:6]:>6s}" for t in tasks))
        for k in results[0]["rows"]:
            ms = [mean(r["rows"][k]) for r in results]
            per = [mean(r["rows"][k][i] for r in results) for i in range(len(tasks))]
            print(f"{k:22s} {mean(ms):5.1f} ({max(ms) - min(ms):4.1f}) | " + " ".join(f"{v:6.1f}" for v in per))
        print("Spearman per seed: " + ", ".join(f"{r['sweep']['spearman']:+.2f}" for r in results))
    print("\n== bars (issue #16)" + (" -- QUICK run: adaptive methods at 1/5 of their steps" if a.quick else ""))
    checks = bars(results, a.quick)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"{sum(ok for _, ok, _ in checks)}/{len(checks)} bars pass; bench {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
