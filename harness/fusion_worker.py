"""The fusion process: main(FOLDER), forked by harness.isolation from its forkserver
(or `python -m harness.fusion_worker FOLDER` by hand).

It reads what the driver wrote into FOLDER (models, the declared examples, the family's
fusion kit, the method and its params), runs the method and writes the fused result into
FOLDER/out. It never opens anything outside FOLDER on the harness's behalf.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The folder's protocol, shared with the driver (harness.isolation): files the driver writes,
# the worker's answers, and the metadata key that keeps a state dict's key order.
GO_MARKER, FUSING_MARKER, RESULT = "go", "fusing", "result.json"
KEY_ORDER = "fbh_key_order"


def save_state(state: Mapping[str, Any], path: Path) -> None:
    """A state dict as safetensors, its key order kept (merges draw random masks in that order)."""
    import torch
    from safetensors.torch import save_file
    seen: set[int] = set()
    plain = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"entry '{k}' of the fused state dict is {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[k] = t
    save_file(plain, str(path), metadata={KEY_ORDER: json.dumps(list(plain))})


def state_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[KEY_ORDER])


def load_state(path: Path, device="cpu") -> dict:
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    return {k: tensors[k].to(device) for k in state_keys(path)}


def fuse(info, ctx, params):
    """Run the method on ctx as every run does: seeded, and handed no more examples than it declared."""
    import torch
    torch.manual_seed(ctx.seed)
    ctx.samples_per_task = info.samples_per_task(params)
    return info.fn(ctx, params)


def load_context(folder: Path, job: dict):
    from harness.api import FusionContext, DataAccessError, _ALLOWED_SPLITS
    from harness.pool import LazyStateDict
    import torch
    from safetensors.torch import load_file
    device = torch.device(job["device"])

    def lazy(name: str) -> LazyStateDict:  # fresh tensors on every access, as the zoo's checkpoints are
        path = folder / name
        return LazyStateDict(path, keys=state_keys(path), device=device)

    tasks = job["tasks"]
    experts = {t: lazy(f"expert-{i}.safetensors") for i, t in enumerate(tasks)}
    data = load_file(str(folder / "data.safetensors"))
    declared_split = (_ALLOWED_SPLITS.get(job["info"].data) or (None,))[0]

    def data_fn(task: str, split: str):
        if split != declared_split or f"inputs/{tasks.index(task)}" not in data:
            raise DataAccessError(f"only the declared split '{declared_split}' is in the fusion process")
        i = tasks.index(task)
        return data[f"inputs/{i}"], data.get(f"labels/{i}")

    kit = torch.load(folder / "kit.pt", weights_only=False)
    return FusionContext(tasks=tasks, load_base=lambda: lazy("base.safetensors"), load_expert=experts.__getitem__,
                         build_module=kit.build, logits_fn=kit.logits, data_fn=data_fn if data else None,
                         data_access=job["info"].data, seed=job["seed"], device=device)


def write_result(out: Path, fused, ctx, peak: int) -> None:
    import torch
    from torch import nn
    from harness.api import Ensemble
    result: dict = {"peak_memory_bytes": peak}
    if isinstance(fused, Ensemble) and not any(isinstance(m, nn.Module) for m in fused.members):
        handed = {id(v): k for k, v in ctx._cache.items()}
        members = []
        for i, m in enumerate(fused.members):
            key = handed.get(id(m))
            if key == "base":
                members.append({"base": True})
            elif key is not None:
                members.append({"expert": ctx.tasks.index(key[1])})
            else:
                save_state(m, out / f"member-{i}.safetensors")
                members.append({"file": f"member-{i}.safetensors"})
        result.update(kind="ensemble", members=members, reduce=fused.reduce,
                      weights=None if fused.weights is None else [float(w) for w in fused.weights])
    elif isinstance(fused, Mapping):
        save_state(fused, out / "fused.safetensors")
        result["kind"] = "state_dict"
    elif isinstance(fused, (nn.Module, Ensemble)):
        torch.save(fused, out / "fused.pt")
        result["kind"] = "pickle"
    else:
        raise TypeError(f"a method must return a state dict, an nn.Module or an Ensemble, not {type(fused).__name__}")
    (out / RESULT).write_text(json.dumps(result))


def exit_with(driver: int) -> None:
    """End this process when the driver that started it is gone (killed, say): the forkserver, not the driver,
    is its parent, so nothing else would, and a fusion nobody waits for must not go on holding the
    driver's output pipes and the machine."""
    from harness.locks import pid_alive

    def watch() -> None:
        while pid_alive(driver):
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="fbh-driver-watch").start()


def main(folder: str | Path, driver: int | None = None) -> int:
    """The fusion process's work: its exit status is 0 when out/result.json holds a result. driver: the pid
    of the process that waits for it; when that process is gone, this one ends too."""
    import torch
    from harness.provenance import PeakMemory
    if driver is not None:
        exit_with(driver)
    folder = Path(folder)
    os.chdir(folder)
    out = folder / "out"
    out.mkdir()
    sys.stdout = sys.stderr  # the method's prints never mix into the command's output (`fbh ci --quiet`)
    try:
        while not (folder / GO_MARKER).exists():  # the driver is still writing the inputs
            time.sleep(0.01)
        import methods
        methods.__path__[:] = json.loads((folder / "methods_path.json").read_text())
        with open(folder / "job.pkl", "rb") as f:
            job = pickle.load(f)
        torch.set_num_threads(job["threads"])
        ctx = load_context(folder, job)
        (folder / FUSING_MARKER).touch()
        with PeakMemory(ctx.device) as mem:
            fused = fuse(job["info"], ctx, job["params"])
        write_result(out, fused, ctx, mem.peak)
        return 0
    except Exception as exc:  # the method's failure: said to the driver, which fails the run
        tail = "".join(traceback.format_exception(exc)[-3:]).rstrip()
        (out / RESULT).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tail}))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
