"""OpenCLIP vision encoders with zero-shot heads: FusionBench's OpenCLIP image-classification setting.

The same setting as clip_vision (only the vision tower is fused; each task's head is fixed,
built from the pre-trained text tower with the dataset's prompt templates averaged), with the
models of the open_clip library instead of transformers. open_clip is an optional extra: it is
imported only here, so the base install, which lacks it, still lists and skips these suites.

References:
- family.base: an open_clip model folder (`open_clip_config.json` + weights), local or a hub id
  (e.g. `timm/vit_base_patch32_clip_224.openai`, which is open_clip's `ViT-B-32` / `openai`).
- family.experts: weight files of fine-tuned vision towers. Keys may carry the prefix of a whole
  CLIP model (`visual.`) or of the Task Arithmetic authors' ImageEncoder (`model.visual.`).
  safetensors always; pickled .pt/.pth/.bin state dicts only with family.allow_pickle.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from harness.errors import FbhError, SuiteUnavailable
from harness.identity import revision_for
from harness.families import OPTIONAL_LIBRARIES
from harness.families.clip_vision import ClipVisionFamily
from harness.families.common import HUB_FIX
from harness.tensors import StateDict

CONFIG_FILE = "open_clip_config.json"
SAFE_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"]
PICKLE_WEIGHTS = ["open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"]
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Where a fine-tuned vision tower's entries may sit inside the file (longest first)
EXPERT_PREFIXES = ("model.visual.", "visual.", "")


def open_clip_module():
    """open_clip, or SuiteUnavailable with the install command when the extra is missing."""
    module, hint = OPTIONAL_LIBRARIES["open_clip_vision"]
    if importlib.util.find_spec(module) is None:
        raise SuiteUnavailable(f"the open_clip_vision family needs the '{module}' package", fix=hint)
    return importlib.import_module(module)


class ImagePreprocessor:
    """open_clip's torchvision transform behind the image-processor calls clip_vision makes,
    so the cached eval tensors (and their corruptions) come from one piece of code."""

    def __init__(self, transform, config: dict):
        self.transform = transform
        self.config = config

    def __call__(self, images: list[np.ndarray], return_tensors: str = "pt") -> dict[str, Tensor]:
        from PIL import Image
        return {"pixel_values": torch.stack([self.transform(Image.fromarray(im)) for im in images])}

    def to_dict(self) -> dict:
        return {"open_clip": self.config}


class OpenClipVisionFamily(ClipVisionFamily):
    MODEL_MODULES = ("open_clip",)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clip: nn.Module | None = None
        self._transform = None

    # -- models ------------------------------------------------------------------
    def _model_dir(self, ref: str, field: str) -> Path:
        """The local folder of an open_clip model; a hub id is fetched (or found in the HF cache)."""
        fam = self.suite.family
        resolved = self.resolve(ref, field)
        if Path(resolved).is_dir():
            folder = Path(resolved)
        else:
            from huggingface_hub import snapshot_download
            wanted = [CONFIG_FILE, *SAFE_WEIGHTS] + (PICKLE_WEIGHTS if fam.allow_pickle else [])
            try:
                folder = Path(snapshot_download(resolved, revision=revision_for(self.suite, ref), allow_patterns=wanted))
            except Exception as exc:  # offline and not cached, unknown repo, ...: all mean "not here"
                raise SuiteUnavailable(f"cannot load model '{ref}': {str(exc).splitlines()[0]}",
                                       file=str(self.suite_file), field=field, fix=HUB_FIX) from None
        if not (folder / CONFIG_FILE).is_file():
            raise SuiteUnavailable(f"'{ref}' is not an open_clip model folder: no {CONFIG_FILE}",
                                   file=str(self.suite_file), field=field,
                                   fix="point at a folder holding open_clip_config.json and its weights")
        if not any((folder / w).is_file() for w in SAFE_WEIGHTS):
            pickled = [w for w in PICKLE_WEIGHTS if (folder / w).is_file()]
            if not pickled or not fam.allow_pickle:
                raise SuiteUnavailable(f"'{ref}' has no safetensors weights ({' or '.join(SAFE_WEIGHTS)})",
                                       file=str(self.suite_file), field=field,
                                       fix="convert it to safetensors, or set family.allow_pickle: true")
        return folder

    def clip(self) -> nn.Module:
        """The whole pre-trained open_clip model (both towers), loaded once."""
        if self._clip is None:
            open_clip = open_clip_module()
            folder = self._model_dir(self.suite.family.base, "family.base")
            self._clip, _, self._transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            self._clip.eval()
        return self._clip

    def load_model(self, ref: str, field: str) -> nn.Module:
        if ref != self.suite.family.base:
            raise FbhError("open_clip experts are weight files of the base's vision tower, not models",
                           file=str(self.suite_file), field=field, fix="use family.experts for them")
        return self.clip().visual

    def load_state(self, ref: str, field: str) -> StateDict:
        if ref == self.suite.family.base:
            return self.held(self.template())
        return self._expert_weights(ref, field)

    def _expert_weights(self, ref: str, field: str) -> StateDict:
        path = Path(self.resolve(ref, field))
        if not path.is_file():
            raise SuiteUnavailable(f"expert weights '{ref}' not found", file=str(self.suite_file), field=field,
                                   fix="download the fine-tuned checkpoints (README, 'OpenCLIP suites')")
        expected = self.template().state_dict()
        if path.suffix in PICKLE_SUFFIXES:
            if not self.suite.family.allow_pickle:
                raise SuiteUnavailable(f"'{ref}' is a pickle checkpoint; pickles can run code when loaded",
                                       file=str(self.suite_file), field=field,
                                       fix="convert it to safetensors, or set family.allow_pickle: true")
            # open_clip's own reader, restricted to tensors (weights_only): a state dict, not a pickled module
            try:
                found = open_clip_module().factory.load_state_dict(str(path), weights_only=True)
            except Exception as exc:  # torch's UnpicklingError names the global it refused to build
                raise FbhError(f"'{ref}' is not a pickled state dict: {str(exc).splitlines()[0]}",
                               file=str(self.suite_file), field=field,
                               fix="a pickled module (the Task Arithmetic checkpoints) must be converted to "
                                   "safetensors first (README, 'OpenCLIP suites')") from None
            read = found.__getitem__
        else:
            handle = safe_open(str(path), "pt")
            found, read = set(handle.keys()), handle.get_tensor
        prefix = next((p for p in EXPERT_PREFIXES if all(p + k in found for k in expected)), None)
        if prefix is None:
            raise FbhError(f"'{ref}' does not hold the base's vision tower (looked for its entries under "
                           f"{[p or '(no prefix)' for p in EXPERT_PREFIXES]})", file=str(self.suite_file),
                           field=field, fix="save the fine-tuned vision tower of the same architecture")
        state = {k: read(prefix + k).to(v.dtype) for k, v in expected.items()}
        wrong = [k for k, v in expected.items() if state[k].shape != v.shape]
        if wrong:
            raise FbhError(f"'{ref}' has other shapes than the base for {wrong[:3]}", file=str(self.suite_file),
                           field=field, fix="use experts fine-tuned from this base architecture")
        return self.held(state)

    # -- heads -------------------------------------------------------------------
    @torch.no_grad()
    def _text_heads(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        open_clip = open_clip_module()
        clip = self.clip()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{self._model_dir(self.suite.family.base, 'family.base')}")
        heads = {}
        for task in self.suite.tasks:
            rows = []
            for name in task.classes:
                text = clip.encode_text(tokenizer([t.replace("{c}", name) for t in task.templates]))
                rows.append(F.normalize(F.normalize(text.float(), dim=-1).mean(0), dim=-1))
            heads[task.name] = torch.stack(rows)
        return heads, {"logit_scale": str(float(clip.logit_scale.exp())),
                       "source": f"zero-shot from {self.suite.family.base} (open_clip)"}

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        head = self.head(task)
        # open_clip's vision tower applies its projection itself
        features = model(inputs.to(self.device, next(model.parameters()).dtype)).float()
        return self._scale * F.normalize(features, dim=-1) @ head.to(features.device).T

    # -- data --------------------------------------------------------------------
    def processor(self):
        if self._processor is None:
            clip = self.clip()
            config = open_clip_module().get_model_preprocess_cfg(clip)
            self._processor = ImagePreprocessor(self._transform, config)
        return self._processor
