"""Method registry: every file in methods/ registers one fusion method on import.

Adding a method never touches the harness: drop a file into methods/ that calls
`@method(...)` and the CLI, runner and site pick it up.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.code_identity import code_digest, module_closure
from harness.errors import FbhError
from harness.paths import cache_dir

Category = Literal["ensemble", "merging", "mixing"]
# What the harness hands the method beyond the models themselves.
DataAccess = Literal["none", "labeled_train", "unlabeled_train", "labeled_validation", "unlabeled_test"]
# What the method returns: a model of the base size, a larger model, or all experts kept.
Output = Literal["merged", "larger", "ensemble"]


class Params(BaseModel):
    """Base class of every method's hyperparameter schema: typed, no unknown keys."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class Properties:
    """The hyperparameters under which a merging method's registry-wide property tests run
    (tests/test_methods_a.py), declared beside the method so adding one edits no test file.

    quick: params for the dtype, expert-order and seed tests (fast settings);
    scaling_zero: params under which the merge must return the base exactly (None: the
    property does not hold for this method, and `why` says why);
    one_expert: params under which merging a single expert returns that expert (None: as above);
    order_invariant: False when the result depends on the order of the experts on purpose.
    """
    quick: dict[str, Any] = field(default_factory=dict)
    scaling_zero: dict[str, Any] | None = None
    one_expert: dict[str, Any] | None = None
    order_invariant: bool = True
    why: str = ""


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
    module: str               # the module the @method decorator ran in, e.g. 'methods.ties_merging'
    summary: str
    reference: str
    # Name of the Params field that holds how many examples per task the method reads;
    # None means the whole split (or no data at all when data == 'none').
    samples: str | None = None
    # Property-test cases of a merging method (None: undeclared, which a test reports). Not
    # compared or hashed: they hold dicts, and a MethodInfo stays hashable as it was.
    properties: Properties | None = field(default=None, compare=False)

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

    def code_files(self) -> dict[str, Path]:
        """Module name -> file of the code this method runs beyond the harness: its module and every
        module of its package it imports (methods/_common.py, ...), transitively."""
        return module_closure(self.module, self.source_file)

    def code_identity(self) -> str:
        """Digest of that code's syntax (comments, layout and docstrings do not count): what a run key
        holds of the method, so an edit to it, or to a helper it imports, re-keys its runs only."""
        return code_digest(self.code_files())


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


_REGISTRY: dict[str, MethodInfo] = {}
_discovered = False
_BROKEN: dict[str, str] = {}  # methods module -> why importing it failed


def method(name: str, *, params: type[Params] = NoParams, category: Category, data: DataAccess = "none",
           output: Output = "merged", trains: bool = False, stochastic: bool = False, samples: str | None = None,
           properties: Properties | None = None):
    """Register `fn(ctx: FusionContext, params) -> fused` as fusion method `name`.

    The fused result is a state dict of the base architecture, an nn.Module that
    replaces the base model, or a harness.api.Ensemble. `samples` names the integer
    hyperparameter that says how many examples per task the method reads; the harness
    hands it no more than that. `properties` declares the hyperparameters of the
    registry-wide property tests (see Properties); every merging method needs it.
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
            module=module.__name__, summary=lines[0] if lines else name, reference=ref, samples=samples,
            properties=properties)
        return fn
    return wrap


def use_project_methods() -> None:
    """Import `methods` from the project fbh works on (harness.paths.project_root), not only from the checkout
    fbh is installed from; once imported, the package stays what it is for the process."""
    from harness.paths import project_root
    root = str(project_root())
    if "methods" not in sys.modules and root not in sys.path:
        sys.path.insert(0, root)


def discover() -> dict[str, MethodInfo]:
    global _discovered
    if not _discovered:
        use_project_methods()
        import methods
        for info in pkgutil.iter_modules(methods.__path__):
            if not info.name.startswith("_"):
                try:
                    importlib.import_module(f"methods.{info.name}")
                except Exception as exc:  # planning imports every method: one broken file must not stop the rest
                    _BROKEN[f"methods.{info.name}"] = f"{type(exc).__name__}: {exc}"
        _discovered = True
    return dict(sorted(_REGISTRY.items()))


def import_failures() -> dict[str, str]:
    """Methods modules that failed to import (module -> error), after discover()."""
    return dict(_BROKEN)


def get(name: str, file: str | None = None) -> MethodInfo:
    registry = discover()
    if name not in registry:
        close = [n for n in registry if n.startswith(name[:3])] or list(registry)
        broken = "".join(f"; {module} failed to import ({why:.300})" for module, why in sorted(_BROKEN.items()))
        raise FbhError(f"unknown method '{name}'{broken}", file=file, field="method",
                       fix=f"use one of: {', '.join(close[:12])} (see `fbh methods list`)"
                           + (", or fix the module that failed to import" if broken else ""))
    return registry[name]


# ----------------------------------------------------------------------------- planning without importing

def code_identity(name: str, file: str | None = None) -> str:
    """MethodInfo.code_identity of method `name`, as planning asks for it. Importing the methods means
    importing torch, most of what an unchanged re-submit costs; so a process that has not imported
    them takes the method's module from the index its last discovery wrote, while nothing that
    discovery read has changed (every file on the methods package's path, this module, the
    interpreter). The digest is always of the files as they are now."""
    if _discovered or name in _REGISTRY:
        return get(name, file).code_identity()
    inputs = _discovery_inputs()
    where = _indexed_modules(inputs).get(name)
    if where is None:
        info = get(name, file)  # discovers every method, or raises the unknown-method error
        _write_index(inputs)
        return info.code_identity()
    return code_digest(module_closure(where[0], Path(where[1])))


def _index_file() -> Path:
    return cache_dir() / "methods-index.json"


def _discovery_inputs() -> str:
    """Digest of what discover() registers from: the files of the methods package, this module's code
    and the interpreter (its environment decides which optional imports succeed)."""
    use_project_methods()
    import methods
    files = [Path(__file__), *sorted(p for d in methods.__path__ for p in Path(d).rglob("*.py"))]
    h = hashlib.sha256(f"{sys.prefix}\0{sys.version}".encode())
    for path in files:
        h.update(f"\0{path}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _read_index(inputs: str) -> dict[str, Any]:
    """The index written by a discovery of these inputs; else empty."""
    try:
        index = json.loads(_index_file().read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) and index.get("inputs") == inputs else {}


def _indexed_modules(inputs: str) -> dict[str, list[str]]:
    """Method name -> [module, file], from an index written from these inputs; else empty."""
    return _read_index(inputs).get("methods", {})


def card(info: MethodInfo) -> dict[str, Any]:
    """What `fbh methods list / show` say of a method: plain JSON, so the index can answer without torch."""
    module = sys.modules.get(info.module)
    return {"name": info.name, "category": info.category, "data": info.data, "output": info.output,
            "trains": info.trains, "stochastic": info.stochastic, "samples": info.samples, "summary": info.summary,
            "reference": info.reference, "doc": inspect.getdoc(module) or inspect.getdoc(info.fn) or "",
            "source": str(info.source_file), "params": info.params.model_json_schema()}


def method_cards() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(name -> card, broken module -> why) of every method: from the index while nothing discovery reads
    has changed, else by discovering them (which writes the index)."""
    inputs = _discovery_inputs()
    index = _read_index(inputs)
    if "cards" in index and not _discovered:
        return index["cards"], index.get("broken", {})
    infos = discover()
    _write_index(inputs)
    return {name: card(info) for name, info in infos.items()}, import_failures()


def _write_index(inputs: str) -> None:
    """The methods package's registrations, from a discovery of `inputs` (digested before it ran, so a
    file changed meanwhile makes the index stale, never wrong). Written whole or not at all."""
    ours = {name: info for name, info in _REGISTRY.items() if info.module.startswith("methods.")}
    methods = {name: [info.module, str(info.source_file)] for name, info in ours.items()}
    cards = {name: card(info) for name, info in ours.items()}
    path = _index_file()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"inputs": inputs, "methods": methods, "cards": cards, "broken": _BROKEN},
                                      default=str))
        os.replace(partial, path)
    except OSError:  # a read-only cache only costs the next plan a discovery
        partial.unlink(missing_ok=True)
