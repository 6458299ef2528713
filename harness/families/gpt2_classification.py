"""GPT-2 sequence classifiers on GLUE (FusionBench's text-classification setting).

Only the GPT-2 body (`GPT2Model`) is fused; every task keeps its own classification head
(`score.weight` of its fine-tuned `GPT2ForSequenceClassification`, e.g. tanganke/gpt2_cola),
applied to the hidden state of the last non-padding token, as the transformers class does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from harness.identity import revision_for
from harness.families.common import (FamilyBase, load_cached, load_pretrained, load_split, pack_text, refuse_corruption,
                                     text_columns, unpack_text)
from harness.spec import SuiteSpec
from harness.tensors import StateDict

MAX_LENGTH = 512  # FusionBench sets tokenizer.model_max_length = 512 for GPT-2 on GLUE


class Gpt2ClassificationFamily(FamilyBase):
    MODEL_MODULES = ("transformers.models.gpt2.modeling_gpt2",)
    HEAD_STATE = ("_heads",)

    def __init__(self, suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: torch.device):
        super().__init__(suite, suite_file, zoo_dir, device)
        self._heads: dict[str, Tensor] = {}
        self._tokenizer = None

    # -- models ------------------------------------------------------------------
    def _load(self, loader, ref: str, field: str) -> nn.Module:
        return load_pretrained(loader, self.suite, self.suite_file, self.resolve, ref, field).eval()

    def load_model(self, ref: str, field: str) -> nn.Module:
        from transformers import GPT2Model
        return self._load(GPT2Model.from_pretrained, ref, field)

    def base_state(self) -> StateDict:
        return self.held(self.template(), copy=True)

    def load_state(self, ref: str, field: str) -> StateDict:
        return self.held(self.load_model(ref, field))

    def expert_state(self, task: str) -> StateDict:
        from transformers import GPT2ForSequenceClassification
        classifier = self._load(GPT2ForSequenceClassification.from_pretrained, self.suite.family.experts[task],
                                f"family.experts.{task}")
        self._heads[task] = classifier.score.weight.detach().float()
        return self.held(classifier.transformer)

    # -- heads -------------------------------------------------------------------
    def head(self, task: str) -> Tensor:
        if task not in self._heads:
            self.expert_state(task)  # the head lives in the task's fine-tuned classifier
        return self._heads[task]

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        ids, mask = unpack_text(inputs, self.device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(dim=1).clamp(min=1) - 1  # right padding: the last real token
        pooled = hidden[torch.arange(len(ids), device=hidden.device), last].float()
        return pooled @ self.head(task).to(pooled.device).T

    # -- data --------------------------------------------------------------------
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            fam = self.suite.family
            tok = AutoTokenizer.from_pretrained(self.resolve(fam.processor or fam.base, "family.processor"),
                                                revision=revision_for(self.suite, fam.processor or fam.base))
            tok.pad_token = tok.pad_token or tok.unk_token or tok.eos_token  # GPT-2 has none; FusionBench's choice
            tok.padding_side = "right"
            self._tokenizer = tok
        return self._tokenizer

    def eval_data(self, task: str, split: str, corruption: str | None = None,
                  severity: int | None = None) -> tuple[Tensor, Tensor]:
        refuse_corruption(self, corruption)
        ds = load_split(self.suite, self.suite_file, self.resolve, task, split)
        columns = text_columns(self.suite, task, ds)
        tok = self.tokenizer()
        label_column = self.suite.task(task).label_column

        def build() -> dict[str, Tensor]:
            enc = tok(*[list(ds[c]) for c in columns], truncation=True, max_length=MAX_LENGTH, padding=True)
            return {"inputs": pack_text(enc), "labels": torch.as_tensor(list(ds[label_column]), dtype=torch.long)}

        key = self.evalset_key(task, split, ds, tokenizer=self.tokenizer_identity(), vocab=len(tok), columns=columns,
                               max_length=MAX_LENGTH)
        t = load_cached("evalsets", f"{task}-{split}", key, build)
        return t["inputs"], t["labels"]

    def score(self, task: str, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.argmax(dim=-1).cpu() == targets.cpu()).float()
