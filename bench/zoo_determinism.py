"""Which process settings change the bytes the tiny-vision zoo's training produces?

    python bench/zoo_determinism.py

Each setting runs a probe in a fresh Python process (settings read at import time, such as
ATEN_CPU_CAPABILITY or MKL_CBWR, cannot leak from one to the next): a few dozen fused-AdamW
steps of a CLIPVisionModel the shape of the zoo's (width 384, two layers, 16x16 patches, its
patch embedding a strided conv) against a fixed head, as the zoo fine-tunes, and of a small
3x3 conv net (the convolution path the zoo's model takes only once, at its patch embedding).
The probe prints the sha256 of each model's trained weights; the table says which settings
give bytes different from the baseline (one thread, every library at its default, trained
in the probe process itself).

Simulating another machine on this one: ATEN_CPU_CAPABILITY=avx2 makes ATen pick the kernels
an AVX2-only CPU gets, MKL_CBWR and MKL_ENABLE_INSTRUCTIONS the MKL code path, and
ONEDNN_MAX_CPU_ISA=AVX2 oneDNN's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 40
BATCH = 32

BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def settings(default_capability: str) -> list[tuple[str, dict[str, str], int, str]]:
    """(label, environment, torch threads, where the training runs: inline | fork | spawn)."""
    return [
        ("baseline (defaults, 1 thread)", {}, 1, "inline"),
        (f"ATEN_CPU_CAPABILITY={default_capability} (the default, pinned)",
         {"ATEN_CPU_CAPABILITY": default_capability}, 1, "inline"),
        ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1, "inline"),
        ("ATEN_CPU_CAPABILITY=default (no SIMD)", {"ATEN_CPU_CAPABILITY": "default"}, 1, "inline"),
        ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, 1, "inline"),
        ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, 1, "inline"),
        ("MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1, "inline"),
        ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 1, "inline"),
        ("2 threads", {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, 2, "inline"),
        ("forked worker (after training in the parent)", {}, 1, "fork"),
        ("spawned worker", {}, 1, "spawn"),
        ("pinned: ATen avx2 + MKL_CBWR=AVX2 + oneDNN AVX2", dict(PINNED), 1, "inline"),
        ("pinned, in a forked worker", dict(PINNED), 1, "fork"),
    ]


# ----------------------------------------------------------------------------- the probe (child side)

def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def clip_model(seed: int):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=384, intermediate_size=768, num_hidden_layers=2,
                                            num_attention_heads=6, image_size=32, patch_size=16,
                                            projection_dim=384))


def conv_model(seed: int):
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GELU(),
                               torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.GELU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))


def train(model, features, steps: int, seed: int) -> str:
    """Fused AdamW against a fixed random head, on seeded random images: the zoo's fine-tuning loop."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)
    head = F.normalize(torch.randn(10, features(model, torch.randn(1, 3, 32, 32)).shape[-1], generator=gen), dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    model.train()
    for _ in range(steps):
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        loss = F.cross_entropy(30 * F.normalize(features(model, x), dim=-1) @ head.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weights_digest(model)


def clip_features(model, x):
    return model(pixel_values=x).pooler_output


def conv_features(model, x):
    return model[:-1](x)


def probe_digests(_=None) -> dict[str, str]:
    import torch
    torch.set_num_threads(int(os.environ["PROBE_THREADS"]))
    return {"clip": train(clip_model(0), clip_features, STEPS, 1),
            "conv": train(conv_model(0), conv_features, STEPS, 2)}


def probe(where: str) -> None:
    import multiprocessing
    import torch
    torch.set_num_threads(int(os.environ["PROBE_THREADS"]))
    if where == "inline":
        digests = probe_digests()
    else:
        if where == "fork":  # as the zoo builder does: autograd and thread pools started before the fork
            train(clip_model(5), clip_features, 3, 5)
        with multiprocessing.get_context(where).Pool(1) as pool:
            digests = pool.apply(probe_digests, (None,))
    print(json.dumps({**digests, "capability": torch.backends.cpu.get_cpu_capability()}))


# ----------------------------------------------------------------------------- the table (parent side)

def run_probe(env: dict[str, str], threads: int, where: str) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    full.update(BASE_ENV, PYTHONPATH=str(REPO), PROBE_THREADS=str(threads), **env)
    out = subprocess.run([sys.executable, __file__, "--probe", where], env=full, capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(f"probe failed ({env}, {threads} threads, {where}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    isa = "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else "no avx2"
    import torch
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
            f"torch {torch.__version__}, default ATen capability {torch.backends.cpu.get_cpu_capability()}")


def main() -> None:
    import torch
    started = time.time()
    print(f"machine: {machine()}")
    print(f"probe: {STEPS} fused-AdamW steps, batch {BATCH}; CLIP = CLIPVisionModel 384x2 patch 16, "
          f"conv = two 3x3 convs; each row a fresh process\n")
    rows = settings(torch.backends.cpu.get_cpu_capability().lower())
    # Two probes at a time: each is single-threaded but for one row, and bytes do not depend on neighbours.
    with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda row: run_probe(*row[1:]), rows))
    rows = [(row[0], got) for row, got in zip(rows, results)]
    base = rows[0][1]
    width = max(len(label) for label, _ in rows)
    print(f"{'setting':{width}s}  {'ATen used':9s}  {'CLIP weights':12s}  {'conv weights':12s}  bytes vs baseline")
    for label, got in rows:
        changed = [k for k in ("clip", "conv") if got[k] != base[k]]
        verdict = "same" if not changed else "DIFFERENT (" + ", ".join(changed) + ")"
        print(f"{label:{width}s}  {got['capability']:9s}  {got['clip'][:12]}  {got['conv'][:12]}  {verdict}")
    print(f"\n{len(rows)} probes in {time.time() - started:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2])
    else:
        main()
