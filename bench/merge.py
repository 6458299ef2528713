"""Merging benchmark: fbh's streaming merges vs FusionBench's algorithms on the same checkpoints.

    python bench/merge.py --size tiny --size vit-b32 [--experts 8] [--scaling 2,4,8]

For each size it saves a random-weight CLIPVisionModel base and 8 experts (base + seeded
noise; ViT-B/32 = transformers' CLIPVisionConfig defaults) with save_pretrained, reads
every file once to warm the page cache, then runs each configuration in a fresh process:

- fbh: ClipVisionFamily (streaming LazyStateDict checkpoints) + the registered method's
  function through a FusionContext + family.build of the merged state dict into a model.
- fusion-bench: fusion_bench's CLIPVisionModelPool (CLIPVisionModel.from_pretrained per
  model, as FusionBench loads them) + TaskArithmeticAlgorithm / SimpleAverageAlgorithm /
  TiesMergingAlgorithm(.run), which return a merged model.
- read: reading every input file's bytes once (into one reused buffer; and safetensors
  load_file touching every tensor). fbh/read divides by the faster of the two.

- fbh without reads (CPU only): the same fbh run with its piece reads skipped (read_slice
  hands back its buffer unfilled), so what is left is fbh's arithmetic and bookkeeping: the
  floor of fbh's merge as written. The merged values are meaningless; only the time counts.

Each configuration runs --repeat times in its fresh process; the fastest run is reported.

--device cuda: fbh merges on the GPU (its streaming checkpoints hand out tensors there, read
into page-locked buffers) and builds the model there; fusion-bench merges as it does (its
model pool loads on the CPU) and its merged model is then moved to the GPU, so both sides
end with a merged model where it will be evaluated. --dtype bfloat16 saves the checkpoints
in bf16 (both sides merge in float32 and round to bf16). GPU peak memory is reported beside
the host's.

Timed: from the start of loading to a merged nn.Module, excluding Python/library
imports (done before the clock starts, in both). Peak memory: the process's resident
high-water mark minus its resident size after the imports. Output: max |fbh - fusion-bench|
over every entry of the merged state dicts (N = --experts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_bytes, machine, make_checkpoints, peak_rss_bytes, rss_bytes, run_worker, write_result  # noqa: E402

METHODS = {
    # fbh method name, fbh params, matching FusionBench algorithm settings
    "task_arithmetic": {"scaling_factor": 0.3},
    "simple_average": {},
    # FusionBench's TIES defaults: top 20% kept, merge_func 'sum', lambda 0.3
    "ties_merging": {"scaling_factor": 0.3, "top_k": 0.2, "top_k_scope": "global", "disjoint_merge": "sum"},
}


# ----------------------------------------------------------------------------- workers

def fbh_merge(method: str, base: Path, experts: list[Path], device: str, dtype: str):
    import torch
    from harness import registry
    from harness.api import FusionContext
    from harness.families.clip_vision import ClipVisionFamily
    from harness.spec import SuiteSpec
    names = [f"expert{i}" for i in range(len(experts))]
    spec = SuiteSpec.model_validate({
        "name": "bench", "precision": dtype, "family": {"kind": "clip_vision", "base": str(base),
                                    "experts": {n: str(d) for n, d in zip(names, experts)}},
        "tasks": [{"name": n, "dataset": "/nonexistent"} for n in names]})
    info = registry.get(method)
    params = info.validate_params(METHODS[method])

    def run():
        family = ClipVisionFamily(spec, base.parent / "bench.yaml", None, torch.device(device))
        ctx = FusionContext(tasks=names, load_base=family.base_state, load_expert=family.expert_state,
                            build_module=family.build)
        return family.build(info.fn(ctx, params))
    return run


def fusion_bench_merge(method: str, base: Path, experts: list[Path], device: str):
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import OmegaConf
    models = OmegaConf.create({"_pretrained_": str(base), **{f"expert{i}": str(d) for i, d in enumerate(experts)}})
    p = METHODS[method]

    def algorithm():
        if method == "task_arithmetic":
            return TaskArithmeticAlgorithm(scaling_factor=p["scaling_factor"])
        if method == "simple_average":
            return SimpleAverageAlgorithm()
        return TiesMergingAlgorithm(scaling_factor=p["scaling_factor"], threshold=p["top_k"], remove_keys=[],
                                    merge_func=p["disjoint_merge"])

    def run():
        return algorithm().run(CLIPVisionModelPool(models)).to(device)
    return run


def read_all(how: str, files: list[Path]):
    """Every input byte read once: into one reused buffer (the copy from the page cache and
    nothing else), or with safetensors load_file plus one touch of every tensor (its
    tensors are lazy views of an mmap, so without the touch nothing would be read)."""
    def run():
        import torch
        if how == "load_file":
            from safetensors.torch import load_file
            return sum(float(t.reshape(-1).view(torch.uint8).sum()) for f in files for t in load_file(str(f)).values()
                       if t.numel())
        buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8)
        view = memoryview(buf.numpy())
        for f in files:
            size = f.stat().st_size
            with open(f, "rb", buffering=0) as fh:
                done = 0
                while done < size:
                    done += fh.readinto(view[done:size])
        return buf
    return run


def worker(args) -> None:
    import torch
    from safetensors.torch import load_file  # noqa: F401  (imports are not timed, for either side)
    from transformers import CLIPVisionModel  # noqa: F401
    base = Path(args.base)
    experts = [Path(p) for p in args.expert]
    if args.impl in ("fbh", "fbh-no-read"):
        import harness.families.clip_vision  # noqa: F401
        if args.impl == "fbh-no-read":
            from harness.pool import LazyStateDict
            LazyStateDict.read_slice = lambda self, key, start, out: out
        from harness import registry
        registry.discover()
        run = fbh_merge(args.method, base, experts, args.device, args.dtype)
    elif args.impl == "fusion-bench":
        import fusion_bench.method  # noqa: F401
        run = fusion_bench_merge(args.method, base, experts, args.device)
    else:
        run = read_all(args.impl, [d / "model.safetensors" for d in [base, *experts]])
    rss0 = rss_bytes()
    gpu = args.device == "cuda"
    if gpu:
        torch.zeros(1, device="cuda")  # the CUDA context is made before the clock, like the imports
        gpu0 = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):  # the fastest of --repeat runs in this fresh process
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) < args.repeat:
            del out
    seconds = min(times)
    growth = peak_rss_bytes() - rss0
    if args.save and isinstance(out, torch.nn.Module):
        from safetensors.torch import save_file
        save_file({k: v.contiguous().cpu() for k, v in out.state_dict().items()}, args.save)
    write_result(args.result, seconds=seconds, peak_growth=growth,
                 gpu_peak=torch.cuda.max_memory_allocated() - gpu0 if gpu else None)


# ----------------------------------------------------------------------------- driver

def max_abs_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), (sorted(set(x) ^ set(y)))[:5]
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def bench_size(size: str, n: int, scaling: list[int], methods: list[str], workdir: Path, repeat: int,
               device: str, dtype: str) -> None:
    print(f"\n=== {size}: {n} experts (+ base), {dtype} checkpoints, merged on {device} ===")
    base, experts = make_checkpoints(size, n, workdir, dtype)
    files = [d / "model.safetensors" for d in [base, *experts]]
    total = sum(f.stat().st_size for f in files)
    print(f"checkpoints: {len(files)} files, {total / 2**20:.1f} MiB in all ({workdir}); page cache warmed")
    read_all("readinto", files)()  # warm the page cache so every side reads from memory

    def timed(impl, method, k, save=None):
        args = ["--impl", impl, "--method", method, "--base", str(base), *sum((["--expert", str(e)]
                for e in experts[:k]), [])]
        r = run_worker(Path(__file__), args + ["--repeat", str(repeat), "--device", device, "--dtype", dtype]
                       + (["--save", save] if save else []))
        gpu_peaks[impl] = r["gpu_peak"]
        return r["seconds"], r["peak_growth"]

    gpu_peaks: dict[str, int | None] = {}

    read_s = {how: timed(how, "-", n)[0] for how in ("readinto", "load_file")}
    read_best = min(read_s.values())
    print(f"read every input byte once: readinto {read_s['readinto']:.3f} s, safetensors load_file + touch "
          f"{read_s['load_file']:.3f} s ({total / read_best / 2**30:.2f} GiB/s)")
    print(f"{'method':16s} {'N':>2s} {'fbh s':>8s} {'fusion-bench s':>14s} {'speed-up':>8s} {'fbh/read':>8s} "
          f"{'fbh peak+':>12s} {'fb peak+':>12s} {'max|diff|':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for k in sorted(set(scaling + [n])):
                save = k == n
                fbh_s, fbh_mem = timed("fbh", method, k, f"{tmp}/fbh.safetensors" if save else None)
                fb_s, fb_mem = timed("fusion-bench", method, k, f"{tmp}/fb.safetensors" if save else None)
                diff = f"{max_abs_diff(f'{tmp}/fbh.safetensors', f'{tmp}/fb.safetensors'):10.2e}" if save else ""
                ratio_read = f"{fbh_s / read_best:8.2f}" if k == n else ""
                if k == n and device == "cpu":
                    floor_s = timed("fbh-no-read", method, k)[0]
                    print(f"{method}: fbh without its reads {floor_s:.3f} s; {fb_s / 5:.3f} s would be 5x fusion-bench",
                          flush=True)
                gpu = (f"   GPU peak+ fbh {fmt_bytes(gpu_peaks['fbh'])}, fb {fmt_bytes(gpu_peaks['fusion-bench'])}"
                       if device == "cuda" else "")
                print(f"{method:16s} {k:2d} {fbh_s:8.3f} {fb_s:14.3f} {fb_s / fbh_s:7.1f}x {ratio_read:>8s} "
                      f"{fmt_bytes(fbh_mem):>12s} {fmt_bytes(fb_mem):>12s} {diff}{gpu}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl"), ap.add_argument("--method"), ap.add_argument("--base")
    ap.add_argument("--expert", action="append", default=[]), ap.add_argument("--save"), ap.add_argument("--result")
    ap.add_argument("--size", action="append", choices=["tiny", "vit-b32"])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--scaling", default="2,4,8", help="expert counts for the peak-memory comparison")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration in its fresh process (fastest is reported)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fbh-bench")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where fbh merges (see above)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="the checkpoints' dtype")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(machine())
    print("baseline: fusion-bench", __import__("importlib.metadata").metadata.version("fusion-bench"))
    for size in args.size or ["tiny"]:
        bench_size(size, args.experts, [int(x) for x in args.scaling.split(",") if x], args.methods.split(","),
                   args.workdir, args.repeat, args.device, args.dtype)


if __name__ == "__main__":
    main()
