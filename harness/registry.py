"""Method registry: every file in methods/ registers one fusion method on import.

Adding a method never touches the harness: drop a file into methods/ that calls
`@method(...)` and the CLI, runner and site pick it up.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import FbhError

Category = Literal["ensemble", "merging", "mixing"]
# What the harness hands the method beyond the models themselves.
DataAccess = Literal["none", "labeled_train", "unlabeled_train", "labeled_validation", "unlabeled_test"]
# What the method returns: a model of the base size, a larger model, or all experts kept.
Output = Literal["merged", "larger", "ensemble"]


class Params(BaseModel):
    """Base class of every method's hyperparameter schema: typed, no unknown keys."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable[..., Any]
    params: type[Params]
    category: Category
    data: DataAccess
    output: Output
    trains: bool
    stochastic: bool
    source_file: Path
    summary: str
    reference: str
    # Name of the Params field that holds how many examples per task the method reads;
    # None means the whole split (or no data at all when data == 'none').
    samples: str | None = None

    def samples_per_task(self, params: Params) -> int | None:
        return None if self.samples is None else getattr(params, self.samples)

    def data_used(self, params: Params) -> str:
        """What the run may read, for the runs table and leaderboard: e.g. 'labeled_train:256/task'."""
        if self.data == "none":
            return "none"
        n = self.samples_per_task(params)
        return f"{self.data}:{'all' if n is None else n}/task"

    def validate_params(self, values: dict[str, Any], file: str = "<params>", prefix: str = "params") -> Params:
        try:
            return self.params.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(all)"
            allowed = ", ".join(f"{k}: {_type_name(f.annotation)}" for k, f in self.params.model_fields.items())
            if err["type"] == "extra_forbidden":
                msg = f"unknown hyperparameter for method '{self.name}'"
            else:
                msg = f"{err['msg']} (got {err.get('input')!r:.60})"
            raise FbhError(msg, file=file, field=f"{prefix}.{key}",
                           fix=f"method '{self.name}' accepts: {allowed or 'no hyperparameters'}") from None

    def code_hash(self) -> str:
        return hashlib.sha256(self.source_file.read_bytes()).hexdigest()[:16]


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


_REGISTRY: dict[str, MethodInfo] = {}
_discovered = False


def method(name: str, *, params: type[Params] = NoParams, category: Category, data: DataAccess = "none",
           output: Output = "merged", trains: bool = False, stochastic: bool = False, samples: str | None = None):
    """Register `fn(ctx: FusionContext, params) -> fused` as fusion method `name`.

    The fused result is a state dict of the base architecture, an nn.Module that
    replaces the base model, or a harness.api.Ensemble. `samples` names the integer
    hyperparameter that says how many examples per task the method reads; the harness
    hands it no more than that.
    """
    if samples is not None:
        if data == "none":
            raise ValueError(f"method '{name}' declares samples='{samples}' but no data access")
        if samples not in params.model_fields:
            raise ValueError(f"method '{name}' declares samples='{samples}', which is not a field of {params.__name__}")
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        module = inspect.getmodule(fn)
        doc = inspect.getdoc(module) or inspect.getdoc(fn) or ""
        if name in _REGISTRY and _REGISTRY[name].fn.__module__ != fn.__module__:
            raise RuntimeError(f"method name '{name}' registered twice "
                               f"({_REGISTRY[name].source_file} and {module.__file__})")
        lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
        ref = next((ln for ln in lines if "arxiv" in ln.lower() or "doi" in ln.lower()), lines[-1] if lines else "")
        _REGISTRY[name] = MethodInfo(
            name=name, fn=fn, params=params, category=category, data=data, output=output,
            trains=trains, stochastic=stochastic, source_file=Path(module.__file__).resolve(),
            summary=lines[0] if lines else name, reference=ref, samples=samples)
        return fn
    return wrap


def discover() -> dict[str, MethodInfo]:
    global _discovered
    if not _discovered:
        import methods
        for info in pkgutil.iter_modules(methods.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"methods.{info.name}")
        _discovered = True
    return dict(sorted(_REGISTRY.items()))


def get(name: str, file: str | None = None) -> MethodInfo:
    registry = discover()
    if name not in registry:
        close = [n for n in registry if n.startswith(name[:3])] or list(registry)
        raise FbhError(f"unknown method '{name}'", file=file, field="method",
                       fix=f"use one of: {', '.join(close[:12])} (see `fbh methods list`)")
    return registry[name]
