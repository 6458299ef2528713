"""What a fusion method sees: the FusionContext, and what it may return.

Methods import from here (and harness.tensors / harness.registry); the harness
never imports a specific method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from harness.registry import DataAccess, Params, method  # re-exported for methods
from harness.tensors import StateDict, task_vector

__all__ = ["FusionContext", "Ensemble", "Params", "method", "StateDict", "DataAccessError"]


class DataAccessError(PermissionError):
    """A method asked for data it did not declare."""


@dataclass
class Ensemble:
    """Keep every member at inference and combine their predictions.

    reduce='mean' averages logits (weighted when weights are given); reduce='max'
    takes, for every class, the largest logit of any member.
    """
    members: Sequence[nn.Module | StateDict]
    weights: Sequence[float] | None = None
    reduce: Literal["mean", "max"] = "mean"


_ALLOWED_SPLITS: dict[str, tuple[str, bool]] = {
    # declared access -> (split it may read, whether labels are handed over)
    "labeled_train": ("train", True),
    "unlabeled_train": ("train", False),
    "labeled_validation": ("validation", True),
    "unlabeled_test": ("test", False),
}


@dataclass
class FusionContext:
    """Models and (declared) data for one fusion.

    base / experts are state dicts of the base architecture; module(sd) builds a
    runnable model from one; logits(model, task, inputs) applies the task's fixed
    head. batches(task, split) yields only the data the method declared.
    """
    tasks: list[str]
    load_base: Callable[[], StateDict]
    load_expert: Callable[[str], StateDict]
    build_module: Callable[[StateDict], nn.Module] | None = None
    logits_fn: Callable[[nn.Module, str, Tensor], Tensor] | None = None
    data_fn: Callable[[str, str], tuple[Tensor, Tensor]] | None = None
    data_access: DataAccess = "none"
    # Examples per task the method declared (MethodInfo.samples_per_task); None = the whole split.
    samples_per_task: int | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_state_dicts(cls, base: StateDict, experts: dict[str, StateDict] | Sequence[StateDict],
                         **kwargs) -> "FusionContext":
        if not isinstance(experts, dict):
            experts = {f"task{i}": e for i, e in enumerate(experts)}
        return cls(tasks=list(experts), load_base=lambda: base, load_expert=experts.__getitem__, **kwargs)

    # -- models ------------------------------------------------------------------
    @property
    def base(self) -> StateDict:
        if "base" not in self._cache:
            self._cache["base"] = self.load_base()
        return self._cache["base"]

    def expert(self, task: str) -> StateDict:
        key = ("expert", task)
        if key not in self._cache:
            self._cache[key] = self.load_expert(task)
        return self._cache[key]

    @property
    def experts(self) -> list[StateDict]:
        return [self.expert(t) for t in self.tasks]

    def task_vectors(self) -> list[StateDict]:
        return [task_vector(self.base, e) for e in self.experts]

    def module(self, state: StateDict | None = None) -> nn.Module:
        if self.build_module is None:
            raise RuntimeError("this context has no model builder (built from bare state dicts)")
        return self.build_module(copy.copy(state if state is not None else self.base)).to(self.device)

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        if self.logits_fn is None:
            raise RuntimeError("this context has no task heads")
        return self.logits_fn(model, task, inputs.to(self.device))

    # -- data --------------------------------------------------------------------
    def batches(self, task: str, split: str, batch_size: int = 128, limit: int | None = None,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Yield (inputs, labels or None) from the first `limit` examples of a declared split.

        A method that declared a sample count reads at most that many examples per task (the
        same first ones on every call); asking for more is an error. With a generator the
        batches come in a random order of those examples.
        """
        allowed = _ALLOWED_SPLITS.get(self.data_access)
        if allowed is None or allowed[0] != split:
            raise DataAccessError(
                f"method declared data access '{self.data_access}' but asked for split '{split}'; "
                "declare the access it needs in @method(data=...)")
        if self.data_fn is None:
            raise DataAccessError("no data is available in this context")
        declared = self.samples_per_task
        if declared is not None and limit is not None and limit > declared:
            raise DataAccessError(f"method asked for {limit} examples of task '{task}' but declared "
                                  f"{declared}; raise its declared sample count instead")
        inputs, labels = self.data_fn(task, split)
        n = min(x for x in (len(inputs), limit, declared) if x is not None)
        order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield inputs[idx].to(self.device), (labels[idx].to(self.device) if allowed[1] else None)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)
