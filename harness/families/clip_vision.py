"""CLIP vision encoders with fixed per-task classification heads.

This is FusionBench's image-classification setting: only the vision tower is fused;
each task's head is fixed (zero-shot text embeddings for real CLIP, class prototypes
from the pre-trained features for the embedded tiny-vision zoo), and
logits = logit_scale * normalize(projection(pooled)) @ head.T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from harness.corruptions import corrupt
from harness.errors import FbhError, SuiteUnavailable
from harness.identity import revision_for
from harness.families.common import FamilyBase, load_cached, load_pretrained, load_split
from harness.pool import LazyStateDict, read_header, safetensors_files
from harness.spec import SuiteSpec
from harness.tensors import StateDict

ZERO_SHOT = "zero_shot"  # family.heads value: compute heads from the base CLIPModel's text tower


class ClipVisionFamily(FamilyBase):
    MODEL_MODULES = ("transformers.models.clip.modeling_clip",)
    HEAD_STATE = ("_heads", "_projection", "_scale")

    def __init__(self, suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: torch.device):
        super().__init__(suite, suite_file, zoo_dir, device)
        self._heads: dict[str, Tensor] | None = None
        self._projection: Tensor | None = None
        self._scale = 100.0
        self._processor = None
        self._splits: dict[tuple[str, str], object] = {}

    # -- models ------------------------------------------------------------------
    def load_model(self, ref: str, field: str) -> nn.Module:
        from transformers import CLIPVisionModel
        # CLIPVisionModel loads the vision tower of a full CLIPModel checkpoint too (openai/clip-vit-*).
        return load_pretrained(CLIPVisionModel.from_pretrained, self.suite, self.suite_file, self.resolve,
                               ref, field).eval()

    def load_state(self, ref: str, field: str) -> StateDict:
        """A streaming state dict when the checkpoint's entries are the model's (zoo and
        save_pretrained vision towers); otherwise the model loaded by transformers."""
        lazy = self._lazy_state(self.resolve(ref, field))
        if lazy is not None:
            return lazy
        return self.held(self.load_model(ref, field))

    def _lazy_state(self, resolved: str) -> LazyStateDict | None:
        if not Path(resolved).is_dir():  # a hub id: transformers resolves it (and its revision)
            return None
        files = safetensors_files(resolved)
        if files is None:
            return None
        expected = self.template().state_dict()
        found = {}
        for f in files:
            found.update(read_header(f))
        if found.keys() != expected.keys() or any(found[k].shape != tuple(v.shape) for k, v in expected.items()):
            return None  # e.g. a full CLIPModel checkpoint: its prefixed keys need transformers' loader
        return LazyStateDict(files, keys=list(expected), dtypes={k: v.dtype for k, v in expected.items()},
                             device=self.device)

    def base_state(self) -> StateDict:
        return self.load_state(self.suite.family.base, "family.base")

    def expert_state(self, task: str) -> StateDict:
        return self.load_state(self.suite.family.experts[task], f"family.experts.{task}")

    # -- heads -------------------------------------------------------------------
    def _load_heads(self) -> None:
        ref = self.suite.family.heads
        if ref is None:
            raise FbhError("clip_vision needs fixed task heads", file=str(self.suite_file), field="family.heads",
                           fix="set family.heads to 'zero_shot' (real CLIP) or a safetensors file of one "
                               "[classes, dim] tensor per task")
        if ref == ZERO_SHOT:
            tensors, meta = self._zero_shot_heads()
        else:
            path = self.resolve(ref, "family.heads")
            if not Path(path).is_file():
                raise SuiteUnavailable(f"heads file '{ref}' not found", file=str(self.suite_file),
                                       field="family.heads", fix="build the zoo or compute the zero-shot heads first")
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        self._scale = float(meta.get("logit_scale", 100.0))
        self._projection = tensors.pop("visual_projection", None)
        missing = [t for t in self.suite.task_names if t not in tensors]
        if missing:
            raise FbhError(f"heads file has no head for tasks {missing}", file=str(self.suite_file),
                           field="family.heads", fix="rebuild the heads for every task")
        self._heads = {t: tensors[t].float() for t in self.suite.task_names}

    def _zero_shot_heads(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """FusionBench's heads for real CLIP: per class, the normalised text embeddings of every
        prompt template, averaged and renormalised; computed once from the pre-trained text tower."""
        fam = self.suite.family
        bare = [t.name for t in self.suite.tasks if not t.classes or not t.templates]
        if bare:
            raise FbhError(f"zero-shot heads need class names and prompt templates; tasks {bare} have none",
                           file=str(self.suite_file), field="tasks[].classes",
                           fix="give each task `classes` (in label order) and `templates` using '{c}'")
        key = {"base": self.input_identity(fam.base, "family.base"),
               "tokenizer": self.input_identity(fam.processor, "family.processor") if fam.processor else None,
               "tasks": [(t.name, t.classes, t.templates) for t in self.suite.tasks], "v": 2}
        return load_cached("heads", "zero-shot", key, self._text_heads, with_metadata=True)

    @torch.no_grad()
    def _text_heads(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        from transformers import AutoTokenizer, CLIPModel
        fam = self.suite.family
        clip = load_pretrained(CLIPModel.from_pretrained, self.suite, self.suite_file, self.resolve, fam.base,
                               "family.base").eval()
        tokenizer = AutoTokenizer.from_pretrained(self.resolve(fam.processor or fam.base, "family.processor"),
                                                  revision=revision_for(self.suite, fam.processor or fam.base))
        heads = {"visual_projection": clip.visual_projection.weight.detach().float()}
        for task in self.suite.tasks:
            rows = []
            for name in task.classes:
                prompts = [t.replace("{c}", name) for t in task.templates]
                tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
                text = clip.get_text_features(input_ids=tokens["input_ids"],
                                              attention_mask=tokens["attention_mask"]).pooler_output
                rows.append(F.normalize(F.normalize(text.float(), dim=-1).mean(0), dim=-1))
            heads[task.name] = torch.stack(rows)
        return heads, {"logit_scale": str(float(clip.logit_scale.exp())), "source": f"zero-shot from {fam.base}"}

    def head(self, task: str) -> Tensor:
        if self._heads is None:
            self._load_heads()
        return self._heads[task]

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        head = self.head(task)
        pooled = model(pixel_values=inputs.to(self.device, next(model.parameters()).dtype)).pooler_output.float()
        if self._projection is not None:
            pooled = pooled @ self._projection.to(pooled.device).T
        return self._scale * F.normalize(pooled, dim=-1) @ head.to(pooled.device).T

    def num_classes(self, task: str) -> int:
        return self.head(task).shape[0]

    # -- data --------------------------------------------------------------------
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor
            ref = self.suite.family.processor or self.suite.family.base
            self._processor = AutoImageProcessor.from_pretrained(self.resolve(ref, "family.processor"),
                                                                 revision=revision_for(self.suite, ref))
        return self._processor

    def _raw_split(self, task: str, split: str):
        # Opened once: a submit asks for each test split under every condition and setting.
        if (task, split) not in self._splits:
            self._splits[task, split] = load_split(self.suite, self.suite_file, self.resolve, task, split)
        return self._splits[task, split]

    def eval_data(self, task: str, split: str, corruption: str | None = None,
                  severity: int | None = None) -> tuple[Tensor, Tensor]:
        """Preprocessed (inputs, labels) for one split and condition, computed once and cached."""
        ds = self._raw_split(task, split)
        proc = self.processor()

        def build() -> dict[str, Tensor]:
            spec = self.suite.task(task)
            image_col = (spec.input_columns or ["image" if "image" in ds.column_names else "img"])[0]
            images = [np.asarray(im.convert("RGB")) for im in ds[image_col]]
            if corruption:
                if len({im.shape for im in images}) == 1:
                    images = list(corrupt(np.stack(images), corruption, severity or 3))
                else:
                    images = [corrupt(im[None], corruption, severity or 3, seed=i)[0] for i, im in enumerate(images)]
            inputs = proc(images=images, return_tensors="pt")["pixel_values"].float().contiguous()
            return {"inputs": inputs, "labels": torch.as_tensor(ds[spec.label_column], dtype=torch.long)}

        key = self.evalset_key(task, split, ds, processor=proc.to_dict(), corruption=corruption, severity=severity)
        t = load_cached("evalsets", f"{task}-{split}-{corruption or 'clean'}", key, build)
        return t["inputs"], t["labels"]

    def score(self, task: str, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.argmax(dim=-1).cpu() == targets.cpu()).float()
