"""Shared pieces of the benchmarks: machine description, fresh-process workers, checkpoints.

Every timed configuration runs in its own fresh Python process (so one configuration's
allocations, caches and imports cannot help or hurt the next) and reports its time and
its peak resident memory growth past the imports as one JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's harness, not whichever one is installed

# CLIP-ViT-B/32 is transformers' CLIPVisionConfig default (hidden 768, 12 layers, patch 32,
# image 224); "tiny" is the tiny-vision zoo's default model shape.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=64),
    "vit-b32": {},
}


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return (f"{platform.node()} | {cpu} | {os.cpu_count()} cores | torch threads {torch.get_num_threads()} | "
            f"{mem_total_gib():.0f} GiB | load average {os.getloadavg()[0]:.1f} | python {platform.python_version()}"
            f" | torch {torch.__version__}")


def mem_total_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 2**20
    return 0.0


def rss_bytes() -> int:
    """Current resident set size of this process."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (the kernel's high-water mark)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def run_worker(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run `python script --worker ARGS --result FILE` in a fresh process; return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               # What fbh sets for itself (harness/__init__.py), given to every side alike, so a
               # comparison measures the code, not OpenMP's spin-waiting on a crowded machine.
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        proc = subprocess.run([sys.executable, str(script), "--worker", *args, "--result", str(result)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"worker {args} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def write_result(path: str, **values) -> None:
    Path(path).write_text(json.dumps(values))


def make_checkpoints(size: str, n_experts: int, root: Path, dtype: str = "float32") -> tuple[Path, list[Path]]:
    """A random-weight base and n experts (base + seeded noise) of the real shapes, saved with
    save_pretrained. Reused when already made."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    out = root / f"{size}-{dtype}-{n_experts}"
    base_dir, expert_dirs = out / "base", [out / f"expert{i}" for i in range(n_experts)]
    if (out / "DONE").is_file():
        return base_dir, expert_dirs
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**SIZES[size])).to(getattr(torch, dtype)).eval()
    model.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for d in expert_dirs:
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base[k] + 0.01 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
        model.save_pretrained(d)
    (out / "DONE").write_text("ok")
    return base_dir, expert_dirs


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"
