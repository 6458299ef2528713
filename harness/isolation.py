"""Fusion in a process of its own that holds only what the method declared.

The driver (harness.runner) writes into a fresh temporary folder the base and the experts
(safetensors), the examples of the one split the method declared (the first
samples_per_task of each task, labels only for labelled access), a fusion kit of the family
(FamilyBase.fusion_kit: the model template and the task heads, no resolver, no suite file,
no data caches) and the method with its validated params. The fusion process (the worker,
harness.fusion_worker.main) is forked from a forkserver: a fresh interpreter started once per
driver, whose environment has the FBH_*/HF_* settings replaced by an empty folder, so the
worker's harness.paths point at nothing of the driver's (no zoo, no evalset cache, no outputs
cache, no database) and its memory holds imported modules only. The worker builds the FusionContext from that
folder, runs the method and writes the fused result back: a state dict as safetensors
(tensors only: no code of the method's comes back); an ensemble as references to the
experts it was handed plus safetensors; anything else (a module of the method's own, a
mixing model) pickled, which runs the method's classes in the driver and is therefore
recorded as not verified (see data_access_verified). The driver evaluates what came back.

The fusion_budget_seconds clock starts when the worker says it calls the method; at the
budget the worker is killed.

What this does not stop: the worker runs as the same user on the same machine, so a method
can still open files by name (a cache folder it guesses, /proc of its parent) or rebuild a
synthetic zoo from its public recipe. Those are closed by the PR workflow, whose fusion job
has no test labels at all (README, "Security").
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import FbhError, MethodFailed
from harness.fusion_worker import FUSING_MARKER, GO_MARKER, RESULT, load_state, save_state
from harness.fusion_worker import main as fusion_main  # the fusion process's entry point
from harness.paths import REPO_ROOT

# How long the worker may take to start (import torch and the method, read its inputs) before
# the method runs; the suite's budget bounds the fusion itself.
STARTUP_SECONDS = 300.0
POLL_SECONDS = 0.02
# Settings of the driver a worker must not inherit: they lead to the caches, zoos and database.
PRIVATE_ENV_PREFIXES = ("FBH_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_CACHE")
UNVERIFIED = ("data access not verified: the fused result is code (a module of the method's own), which only "
              "a maintainer's approval (methods/approved.txt) lets trusted code load")
BUDGET_FIX = ("lower the method's steps or data for this suite (a submission per suite), or argue for a larger "
              "budget in the suite file")


class FusionTimeout(FbhError):
    """The method was still fusing at the suite's budget."""


@dataclass
class Fused:
    value: Any                  # a state dict, an nn.Module or an api.Ensemble, as the method returned it
    seconds: float              # from the method's call to its result written, measured by the driver
    peak_memory_bytes: int | None
    verified: bool              # only tensors came back: no code of the method's runs in the driver


# ----------------------------------------------------------------------------- the driver's side

def declared_data(handle, tasks: list[str], info, params) -> dict[str, dict]:
    """task -> {'inputs', and 'labels' for labelled access}: the first samples_per_task examples of
    the one split the method declared; nothing for data='none'."""
    from harness.api import _ALLOWED_SPLITS
    allowed = _ALLOWED_SPLITS.get(info.data)
    if allowed is None:
        return {}
    split, labelled = allowed
    limit = info.samples_per_task(params)
    out = {}
    for task in tasks:
        t = handle.spec.task(task)
        name = {"train": t.train_split, "validation": t.validation_split, "test": t.split}[split]
        if name is None:
            raise FbhError(f"task '{task}' declares no {split} split", file=str(handle.file),
                           field=f"tasks[{task}].{split}_split", fix=f"declare a {split} split for this method")
        inputs, labels = handle.family.eval_data(task, name)
        n = len(inputs) if limit is None else min(limit, len(inputs))
        out[task] = {"inputs": inputs[:n].contiguous()}
        if labelled:
            out[task]["labels"] = labels[:n].contiguous()
    return out


def worker_env(empty: Path) -> dict[str, str]:
    """The driver's environment without its fbh and hub settings, which point at the caches; the
    fusion processes' point at an empty folder instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
    env.update(FBH_CACHE=str(empty), FBH_DB=str(empty / "none.duckdb"), FBH_SUITES_DIR=str(empty),
               FBH_SUBMISSIONS_DIR=str(empty), HF_HOME=str(empty), HF_HUB_OFFLINE="1")
    return env


_processes = None  # the multiprocessing context fusion processes start from, once per driver
_empty: Path | None = None  # the folder the fusion processes' FBH_*/HF_* settings point at


def fusion_processes(family_kind: str):
    """Fusion processes fork from a forkserver: a fresh interpreter, started once with worker_env,
    that has imported torch, the worker and the family's model code but holds nothing of this
    process's memory, so each fusion process starts in milliseconds instead of importing torch.
    Called early (runner.submit), its imports overlap the driver's own work."""
    global _processes
    if _processes is None:
        import importlib
        from harness.families import FAMILIES
        module, cls = FAMILIES[family_kind].split(":")
        preload = [module, *getattr(importlib.import_module(module), cls).MODEL_MODULES]
        import multiprocessing
        from multiprocessing import forkserver
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["harness.fusion_worker", "harness.pool", "harness.provenance", *preload])
        with scrubbed_environ():
            forkserver.ensure_running()
        _processes = context
    return _processes


@contextlib.contextmanager
def scrubbed_environ():
    """What the forkserver and each fusion process start from: the environment without the driver's
    settings (a server that died, killed by a method, restarts scrubbed too), and no main module:
    multiprocessing would otherwise import the driver's script (`fbh`, pytest, a bench) again in
    every fusion process, which costs its imports and is none of the fusion's business."""
    global _empty
    if _empty is None:
        _empty = Path(tempfile.mkdtemp(prefix="fbh-fusion-env-"))
    saved, main = dict(os.environ), sys.modules.get("__main__")
    try:
        os.environ.clear()
        os.environ.update(worker_env(_empty))
        sys.modules["__main__"] = types.ModuleType("__main__")
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.modules["__main__"] = main


def write_inputs(folder: Path, handle, tasks: list[str], info, params, seed: int, device) -> None:
    import torch
    from safetensors.torch import save_file
    family = handle.family
    save_state(family.base_state(), folder / "base.safetensors")
    for i, task in enumerate(tasks):
        save_state(family.expert_state(task), folder / f"expert-{i}.safetensors")
    data = declared_data(handle, tasks, info, params)
    save_file({f"{kind}/{i}": t for i, task in enumerate(tasks) for kind, t in data.get(task, {}).items()},
              str(folder / "data.safetensors"))
    torch.save(family.fusion_kit(), folder / "kit.pt")
    import methods  # folders added to the package at run time (tests, plugins) hold methods too
    (folder / "methods_path.json").write_text(json.dumps([str(Path(p).resolve()) for p in methods.__path__]))
    with open(folder / "job.pkl", "wb") as f:
        pickle.dump({"info": info, "params": params, "tasks": tasks, "seed": seed, "device": str(device),
                     "threads": torch.get_num_threads()}, f)


def isolated_fuse(handle, tasks: list[str], info, params, seed: int, device, budget: float | None = None,
                  progress=print, keep: Path | None = None) -> Fused:
    """Run info's method on the suite's models in a worker process that holds only what it declared;
    ended at `budget` seconds of fusion (FusionTimeout naming the suite's field). keep: a folder to
    copy the worker's answer into (`fbh ci --fuse-only`), read later by read_result."""
    folder = Path(tempfile.mkdtemp(prefix="fbh-fusion-"))
    try:
        proc = fusion_processes(handle.spec.family.kind).Process(target=fusion_main, args=(str(folder), os.getpid()))
        with scrubbed_environ():
            proc.start()
        try:
            write_inputs(folder, handle, tasks, info, params, seed, device)
            (folder / GO_MARKER).touch()
            seconds = wait_for_worker(proc, folder, budget, handle)
        finally:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
        if keep is not None:
            shutil.copytree(folder / "out", keep, dirs_exist_ok=True)
        return read_result(folder / "out", handle, tasks, seconds, progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_worker(proc, folder: Path, budget: float | None, handle) -> float:
    """Seconds from the method's call to the worker's exit; the worker is killed at the budget."""
    started_waiting, fusing_since = time.perf_counter(), None
    while proc.exitcode is None:
        now = time.perf_counter()
        if fusing_since is None and (folder / FUSING_MARKER).exists():
            fusing_since = now
        if fusing_since is None and now - started_waiting > STARTUP_SECONDS:
            raise MethodFailed(f"the fusion process did not start the method within {STARTUP_SECONDS:g} s")
        if fusing_since is not None and budget is not None and now - fusing_since > budget:
            proc.kill()
            raise FusionTimeout(f"fusion was still running after {now - fusing_since:.1f} s, over the suite's budget "
                                f"of {budget:g} s, and was stopped", file=str(handle.file),
                                field="fusion_budget_seconds", fix=BUDGET_FIX)
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - (fusing_since or started_waiting)


def read_result(out: Path, handle, tasks: list[str], seconds: float, progress, load_code: bool = True) -> Fused:
    """The fused result a worker wrote into `out`. load_code=False (a trusted CI job): a result
    that is code (a pickled module) is refused instead of loaded."""
    import torch
    from harness.api import Ensemble
    try:
        result = json.loads((out / RESULT).read_text())
    except (OSError, ValueError):
        raise MethodFailed("the fusion process ended without a result (killed, or it crashed)") from None
    if result.get("error"):
        progress(result.get("traceback", ""))
        raise MethodFailed(result["error"])
    kind, family = result["kind"], handle.family
    peak = result.get("peak_memory_bytes")
    if kind == "state_dict":
        return Fused(load_state(out / "fused.safetensors", family.device), seconds, peak, True)
    if kind == "ensemble":
        def member(ref: dict):
            if "expert" in ref:
                return family.expert_state(tasks[ref["expert"]])
            if "base" in ref:
                return family.base_state()
            return load_state(out / ref["file"], family.device)
        value = Ensemble([member(m) for m in result["members"]], result["weights"], result["reduce"])
        return Fused(value, seconds, peak, True)
    # A module of the method's own comes back pickled: loading it runs the method's classes here.
    if not load_code:
        raise MethodFailed(UNVERIFIED)
    return Fused(torch.load(out / "fused.pt", map_location=family.device, weights_only=False), seconds, peak, False)


# ----------------------------------------------------------------------------- approval

APPROVED_FILE = REPO_ROOT / "methods" / "approved.txt"


def approved_methods(path: Path = APPROVED_FILE) -> set[str]:
    """'name:code identity' of the methods a maintainer has read and vouches for although their result
    comes back as code (a module of their own): one a line, '#' starts a comment. Approval is of
    the code, so any edit to the method or a helper it imports needs approving again; a PR that
    edits this file approves nothing in CI, whose trusted job evaluates with main's copy."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    return {ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()}


def is_approved(info) -> bool:
    return f"{info.name}:{info.code_identity()}" in approved_methods()
