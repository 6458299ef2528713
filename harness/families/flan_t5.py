"""Flan-T5 on GLUE as text-to-text generation (FusionBench's Flan-T5 setting).

Each example becomes the paper's prompt (Appendix D; the templates live in the suite file)
and the target is the label's word (or STSB's score as '{:.1f}'). Experts are full
fine-tuned checkpoints, or LoRA adapters (peft) that are merged into dense weights before
fusion. Evaluation decodes greedily (FusionBench's generate(max_length=10)); an ensemble
decodes with its members' next-token logits combined at every step. Metrics: exact match;
STSB Spearman, with unparseable outputs read as 0.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from harness.errors import FbhError, SuiteUnavailable
from harness.identity import revision_for
from harness.families.common import (FamilyBase, HUB_FIX, load_cached, load_pretrained, load_split, pack_text,
                                     refuse_corruption, unpack_text)
from harness.predictor import combine
from harness.spec import SuiteSpec
from harness.tensors import StateDict

MAX_LENGTH = 512
GENERATION_MAX_LENGTH = 10  # FusionBench: model.generate(input_ids, max_length=10), decoder start included


class FlanT5Family(FamilyBase):
    MODEL_MODULES = ("transformers.models.t5.modeling_t5",)
    def __init__(self, suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: torch.device):
        super().__init__(suite, suite_file, zoo_dir, device)
        self._tokenizer = None

    # -- models ------------------------------------------------------------------
    def load_model(self, ref: str, field: str) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM
        return load_pretrained(AutoModelForSeq2SeqLM.from_pretrained, self.suite, self.suite_file, self.resolve,
                               ref, field).eval()

    def _adapter_config(self, ref: str):
        """The LoRA adapter's config if ref is a peft adapter (adapter_config.json), else None."""
        from peft import PeftConfig
        resolved = self.resolve(ref)
        if Path(resolved).exists() and not (Path(resolved) / "adapter_config.json").is_file():
            return None
        try:
            return PeftConfig.from_pretrained(resolved, revision=revision_for(self.suite, ref))
        except (ValueError, OSError):
            return None

    def load_state(self, ref: str, field: str) -> StateDict:
        if self._adapter_config(ref) is None:
            return self.held(self.load_model(ref, field))
        from peft import PeftModel
        resolved = Path(self.resolve(ref, field))
        if not self.suite.family.allow_pickle and resolved.exists() \
                and not (resolved / "adapter_model.safetensors").is_file():
            raise SuiteUnavailable(f"LoRA adapter '{ref}' has no adapter_model.safetensors", file=str(self.suite_file),
                                   field=field, fix="convert it to safetensors, or set family.allow_pickle: true")
        try:
            adapted = PeftModel.from_pretrained(copy.deepcopy(self.template()), self.resolve(ref, field),
                                                revision=revision_for(self.suite, ref))
        except (OSError, ValueError) as exc:
            raise SuiteUnavailable(f"cannot load LoRA adapter '{ref}': {str(exc).splitlines()[0]}",
                                   file=str(self.suite_file), field=field, fix=HUB_FIX) from None
        # The paper merges and unloads LoRA adapters, then fuses the dense models.
        return self.held(adapted.merge_and_unload())

    def base_state(self) -> StateDict:
        return self.held(self.template(), copy=True)

    def expert_state(self, task: str) -> StateDict:
        return self.load_state(self.suite.family.experts[task], f"family.experts.{task}")

    # -- outputs -----------------------------------------------------------------
    def _start(self, model: nn.Module, n: int) -> Tensor:
        return torch.full((n, 1), model.config.decoder_start_token_id, dtype=torch.long, device=self.device)

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        """Logits of the first generated token: what test-time adaptation methods (entropy) read."""
        ids, mask = unpack_text(inputs, self.device)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=self._start(model, len(ids))).logits[:, -1]

    @torch.no_grad()
    def predict(self, predictor, task: str, inputs: Tensor, batch_size: int) -> Tensor:
        """Greedy decoding, [N, GENERATION_MAX_LENGTH - 1] token ids padded with pad_token_id."""
        members = predictor.members
        config = members[0].config
        steps = GENERATION_MAX_LENGTH - 1
        outs = []
        for start in range(0, len(inputs), batch_size):
            ids, mask = unpack_text(inputs[start:start + batch_size], self.device)
            encoded = [m.get_encoder()(input_ids=ids, attention_mask=mask) for m in members]
            decoded = self._start(members[0], len(ids))
            done = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
            for _ in range(steps):
                step = torch.stack([m(encoder_outputs=e, attention_mask=mask, decoder_input_ids=decoded).logits[:, -1]
                                    .float() for m, e in zip(members, encoded)])
                token = combine(predictor, step).argmax(dim=-1)
                token = torch.where(done, torch.full_like(token, config.pad_token_id), token)
                decoded = torch.cat([decoded, token[:, None]], dim=1)
                done |= token == config.eos_token_id
                if done.all():
                    break
            tokens = torch.full((len(ids), steps), config.pad_token_id, dtype=torch.long)
            tokens[:, :decoded.shape[1] - 1] = decoded[:, 1:].cpu()
            outs.append(tokens)
        return torch.cat(outs)

    # -- data --------------------------------------------------------------------
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            fam = self.suite.family
            self._tokenizer = AutoTokenizer.from_pretrained(self.resolve(fam.processor or fam.base,
                                                                         "family.processor"),
                                                            revision=revision_for(self.suite, fam.processor or fam.base))
        return self._tokenizer

    def _target_text(self, task: str, label) -> str:
        classes = self.suite.task(task).classes
        return classes[int(label)] if classes else f"{float(label):.1f}"  # STSB: the score, as FusionBench writes it

    def eval_data(self, task: str, split: str, corruption: str | None = None,
                  severity: int | None = None) -> tuple[Tensor, Tensor]:
        refuse_corruption(self, corruption)
        spec = self.suite.task(task)
        if not spec.templates:
            raise FbhError(f"task '{task}' has no prompt template", file=str(self.suite_file),
                           field=f"tasks[{task}].templates", fix="give one template using '{column}' fields")
        ds = load_split(self.suite, self.suite_file, self.resolve, task, split)
        tok = self.tokenizer()

        def build() -> dict[str, Tensor]:
            prompts = [spec.templates[0].format(**row) for row in ds]
            targets = [self._target_text(task, label) for label in ds[spec.label_column]]
            enc = tok(prompts, truncation=True, max_length=MAX_LENGTH, padding=True)
            labels = tok(targets, padding=True)["input_ids"]
            return {"inputs": pack_text(enc), "labels": torch.as_tensor(labels, dtype=torch.long)}

        key = self.evalset_key(task, split, ds, tokenizer=self.tokenizer_identity(), vocab=len(tok),
                               max_length=MAX_LENGTH)
        t = load_cached("evalsets", f"{task}-{split}", key, build)
        return t["inputs"], t["labels"]

    # -- metrics -----------------------------------------------------------------
    def _texts(self, tokens: Tensor) -> list[str]:
        # Compared as decoded, unstripped, as FusionBench's glue_evaluation compares them: an answer
        # with a stray trailing space is no exact match there, so it is none here either.
        return self.tokenizer().batch_decode(tokens.tolist(), skip_special_tokens=True)

    def score(self, task: str, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.tensor([float(o == t) for o, t in zip(self._texts(outputs), self._texts(targets))])

    def statistic(self, task: str, outputs: Tensor, targets: Tensor):
        if self.suite.task(task).metric != "spearman":
            return None
        from scipy.stats import spearmanr
        preds = torch.tensor([_number(s) for s in self._texts(outputs)], dtype=torch.float64)
        gold = torch.tensor([_number(s) for s in self._texts(targets)], dtype=torch.float64)

        def spearman(idx: Tensor) -> float:
            p, g = preds[idx], gold[idx]
            if p.min() == p.max() or g.min() == g.max():
                # Constant outputs (e.g. all unparseable) have no rank correlation: count none. FusionBench's
                # scipy call gives NaN here, which no published row is (tests/test_eval_parity.py).
                return 0.0
            return 100 * float(spearmanr(p.numpy(), g.numpy()).statistic)
        return spearman


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0  # FusionBench reads unparseable outputs as 0
