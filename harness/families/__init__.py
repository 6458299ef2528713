"""Model-family adapters: how to load, rebuild, run and score one kind of model.

A family turns a suite's references into state dicts and runnable modules, gives the
fixed task heads, preprocessed (and cached) evaluation tensors, and per-example scores.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from harness.errors import FbhError
from harness.spec import SuiteSpec

if TYPE_CHECKING:  # the family registry is read while planning, which must not import torch
    import torch
    from torch import Tensor, nn

    from harness.tensors import StateDict

FAMILIES = {
    "clip_vision": "harness.families.clip_vision:ClipVisionFamily",
    "gpt2_classification": "harness.families.gpt2_classification:Gpt2ClassificationFamily",
    "flan_t5": "harness.families.flan_t5:FlanT5Family",
    "resnet_nyuv2": "harness.families.resnet_nyuv2:ResnetNyuv2Family",
    "open_clip_vision": "harness.families.open_clip_vision:OpenClipVisionFamily",
}

# The base pin (torch 2.13, CPU) has no torchvision that imports beside it, so OpenCLIP lives in
# its own environment with the torch build that torchvision 0.29.1 was made for.
OPENCLIP_INSTALL = ("python3 -m venv .venv-openclip && .venv-openclip/bin/pip install -r "
                    "<(python3 .ci/openclip_requirements.py) && .venv-openclip/bin/pip install --no-deps -e .")
# Families whose library is an optional extra: kind -> (module imported, how to install it)
OPTIONAL_LIBRARIES = {
    "open_clip_vision": ("open_clip", f"install the openclip extra: {OPENCLIP_INSTALL}"),
}


class Family(Protocol):
    suite: SuiteSpec

    def base_state(self) -> StateDict: ...
    def expert_state(self, task: str) -> StateDict: ...
    def load_state(self, ref: str, field: str) -> StateDict: ...
    def build(self, state: StateDict) -> nn.Module: ...
    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor: ...
    def eval_data(self, task: str, split: str, corruption: str | None = None,
                  severity: int | None = None) -> tuple[Tensor, Tensor]: ...
    def score(self, task: str, outputs: Tensor, targets: Tensor) -> Tensor: ...

    # Optional hooks, looked up by harness.evaluate:
    #   predict(predictor, task, inputs, batch_size) -> outputs    when outputs are not one pass of
    #       logits (generated text); combine members with harness.predictor.combine
    #   statistic(task, outputs, targets) -> (index sample -> value) | None    for corpus-level
    #       metrics (Spearman, mIoU), in reported units; None falls back to the mean of score()
    #   metric_statistic(task, metric, outputs, targets) -> (index sample -> value)    for a task's
    #       extra_metrics (pixel accuracy beside mIoU), in reported units


def load_family(suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: "torch.device") -> Family:
    target = FAMILIES.get(suite.family.kind)
    if target is None:
        raise FbhError(f"unknown model family '{suite.family.kind}'", file=str(suite_file), field="family.kind",
                       fix=f"use one of: {', '.join(sorted(FAMILIES))}")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(suite=suite, suite_file=suite_file, zoo_dir=zoo_dir, device=device)
