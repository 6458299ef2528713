"""Executors: where planned jobs run. Each is `fn(jobs, device, progress) -> iterable of JobResult`.

* local (harness.runner.local_executor): in this process, one job after another.
* Ray (`ray_executor`): one Ray task per job on an existing cluster; a task asks for one
  GPU when the device is cuda (so Ray runs one job per GPU), else one CPU.
* Slurm (`submitit_executor`): one Slurm array task per batch of jobs through submitit;
  `cluster="local"` runs the same pickled jobs as local subprocesses (for tests and laptops).

Workers only compute: they return JobResults (a Run dataclass and plain result dicts) and
the driver writes DuckDB as results arrive. An executor with `resolves_device = True`
receives the user's device choice ('auto' | 'cpu' | 'cuda') unresolved, because 'auto'
must be decided by the workers' hardware, not the driver's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from harness.errors import FbhError
from harness.paths import REPO_ROOT
from harness.planner import Job

# The driver's settings that workers need to find the same suites and zoo cache.
FORWARDED_ENV = ("FBH_CACHE", "FBH_SUITES_DIR", "HF_HOME", "HF_HUB_OFFLINE")
# What Ray must not ship to workers with the code.
SHIP_EXCLUDES = [".git", ".fbh", "*.duckdb", "*.duckdb.wal", "_site", ".venv", "__pycache__", "build", "dist"]

EXECUTORS = ("local", "ray", "slurm", "submitit-local")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def worker_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_batch(jobs: list[Job], device: str, env: dict[str, str]) -> list:
    """Worker entry point: run jobs in order with the driver's environment; return their JobResults."""
    os.environ.update(env)
    from harness.runner import execute_job
    return [execute_job(job, device, worker_progress) for job in jobs]


def lost_result(job: Job, exc: BaseException):
    """A job whose worker failed (crash, lost node, timeout): a failed run, so the batch goes on."""
    from harness.runner import JobResult, identity_fields
    from harness.store import Run, now
    sub = job.submission or {}
    run = Run(run_key=job.key, kind=job.kind, label=job.label, suite=job.suite, setting=job.setting,
              submission=sub.get("name"), method=sub.get("method"), status="failed",
              error=f"worker failed: {type(exc).__name__}: {exc}"[:2000], started_at=now(), finished_at=now(),
              **identity_fields(job))
    return JobResult(job, run, [])


def _remote_device(device: str, has_gpus: bool, where: str) -> str:
    if device == "auto":
        return "cuda" if has_gpus else "cpu"
    if device == "cuda" and not has_gpus:
        raise FbhError(f"--device cuda was asked for but {where} offers no GPU", field="--device",
                       fix="use --device cpu, or add GPU nodes / --gpus-per-task")
    return device


# ----------------------------------------------------------------------------- Ray

def ray_executor(address: str | None, *, ship_code: bool = True) -> Callable:
    """Run each job as a Ray task on the cluster at `address` (e.g. 'HOST:6379'; None starts a local one).

    With ship_code the driver's checkout goes to the workers as the task's working_dir, so
    they run the same harness and methods whose bytes are in the jobs' keys; without it the
    workers import fbh from their own PYTHONPATH (a shared file system).
    """
    def execute(jobs: list[Job], device: str, progress) -> Iterator:
        try:
            import ray
        except ImportError:
            raise FbhError("the Ray executor needs Ray", field="--executor",
                           fix="pip install 'fbh[ray]'") from None
        env = forwarded_env()
        runtime_env: dict = {"env_vars": env}
        if ship_code:
            runtime_env.update(working_dir=str(REPO_ROOT), excludes=SHIP_EXCLUDES)
        else:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        owns = not ray.is_initialized()
        if owns:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        try:
            dev = _remote_device(device, ray.cluster_resources().get("GPU", 0) > 0, "the Ray cluster")
            resources = {"num_gpus": 1, "num_cpus": 1} if dev == "cuda" else {"num_cpus": 1}
            task = ray.remote(**resources, max_retries=1)(run_batch)
            pending = {task.remote([job], dev, env): job for job in jobs}
            progress(f"ray: {len(pending)} jobs on {dev} ({ray.cluster_resources()})")
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    yield from ray.get(done[0])
                except Exception as exc:  # a lost worker fails its job, not the batch
                    yield lost_result(job, exc)
        finally:
            if owns:
                ray.shutdown()

    execute.resolves_device = True
    return execute


# ----------------------------------------------------------------------------- Slurm / submitit

def submitit_executor(folder: Path | str, *, cluster: str | None = "slurm", jobs_per_task: int = 1,
                      poll_seconds: float = 10.0, **parameters) -> Callable:
    """Run batches of `jobs_per_task` jobs as a submitit job array.

    `parameters` go to AutoExecutor.update_parameters (e.g. slurm_partition, gpus_per_node,
    cpus_per_task, timeout_min, slurm_array_parallelism). Batching amortizes the torch
    import and model loading that dominate small jobs. Workers import fbh from the driver's
    PYTHONPATH, so the checkout must be on a file system the nodes share.
    """
    def execute(jobs: list[Job], device: str, progress) -> Iterator:
        try:
            import submitit
        except ImportError:
            raise FbhError("the Slurm executor needs submitit", field="--executor",
                           fix="pip install 'fbh[slurm]'") from None
        gpus = int(parameters.get("gpus_per_node") or 0)
        dev = _remote_device(device, gpus > 0, "the Slurm request (--gpus-per-task 0)")
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        executor.update_parameters(**parameters)
        env = forwarded_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        batches = [jobs[i:i + jobs_per_task] for i in range(0, len(jobs), max(1, jobs_per_task))]
        handles = executor.map_array(run_batch, batches, [dev] * len(batches), [env] * len(batches))
        by_id = {h.job_id: batch for h, batch in zip(handles, batches)}
        progress(f"submitit ({executor.cluster}): {len(jobs)} jobs in {len(handles)} tasks on {dev}, "
                 f"logs in {folder}")
        for handle in submitit.helpers.as_completed(handles, poll_frequency=poll_seconds):
            try:
                yield from handle.result()
            except Exception as exc:
                yield from (lost_result(job, exc) for job in by_id[handle.job_id])

    execute.resolves_device = True
    return execute


def make_executor(name: str, *, address: str | None = None, folder: Path | str | None = None,
                  jobs_per_task: int = 1, slurm: dict | None = None) -> Callable:
    """The executor the CLI names: local | ray | slurm | submitit-local."""
    if name == "local":
        from harness.runner import local_executor
        return local_executor
    if name == "ray":
        return ray_executor(address)
    if name in ("slurm", "submitit-local"):
        cluster = "slurm" if name == "slurm" else "local"
        params = {k: v for k, v in (slurm or {}).items() if v is not None}
        if cluster == "local":  # local processes know only the generic parameters
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        return submitit_executor(folder or Path(".fbh") / "submitit", cluster=cluster,
                                 jobs_per_task=jobs_per_task, poll_seconds=1.0 if cluster == "local" else 10.0,
                                 **params)
    raise FbhError(f"unknown executor '{name}'", field="--executor", fix=f"use one of: {', '.join(EXECUTORS)}")
