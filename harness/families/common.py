"""What every family adapter shares: loading models and dataset splits through the real
libraries (so a local copy and a hub id take the same path), unavailability errors, the
eval-tensor cache, and packing tokenised text into one tensor."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from harness.digests import load_verified, save_verified
from harness.errors import FbhError, SuiteUnavailable
from harness.identity import input_identity, revision_for
from harness.paths import cache_dir
from harness.sources import Resolver
from harness.spec import SuiteSpec

class NoFiles:
    """The resolver of a fusion kit: a kit builds models and applies heads, it never opens a file."""

    def __call__(self, ref: str, field: str = "") -> str:
        raise PermissionError(f"the fusion process cannot open '{ref}': it holds no paths to the suite's files")

    def eval_data(self, task: str, split: str, *args, **kwargs):
        raise PermissionError(f"the fusion process cannot open the {split} split of '{task}': it holds no data "
                              "beyond what the method declared")


class FamilyBase:
    """The plumbing every family shares: the suite, its resolver and device, a template model of the
    base architecture loaded once, and building a runnable model from a state dict of it."""

    # What logits() reads beyond the template once the heads are loaded: a fusion kit carries these only.
    HEAD_STATE: tuple[str, ...] = ()
    # The modules of the template's classes, imported once by the fusion processes' forkserver.
    MODEL_MODULES: tuple[str, ...] = ()

    def __init__(self, suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: torch.device):
        self.suite = suite
        self.suite_file = suite_file
        self.resolve = Resolver(suite_file, zoo_dir)
        self.device = device
        self.dtype = getattr(torch, suite.precision)
        self._template = None

    def input_identity(self, ref: str, field: str, repo_type: str = "model") -> str:
        """The content identity of one model or dataset reference (harness.identity)."""
        return input_identity(self.resolve(ref, field), self.suite, ref, repo_type, self.suite_file, field)

    def evalset_key(self, task: str, split: str, ds, **preprocessing) -> dict:
        """What a preprocessed evaluation set depends on: the dataset's content, everything the suite
        declares about the task (columns, labels, caps, templates), the split and its size, and the
        family's own preprocessing (processor or tokenizer identity, lengths, ...)."""
        index = self.suite.task_names.index(task)
        return {"dataset": self.input_identity(self.suite.task(task).dataset, f"tasks[{index}].dataset", "dataset"),
                "task": self.suite.task(task).model_dump(mode="json"), "split": split, "n": len(ds),
                "family": self.suite.family.kind, **preprocessing, "v": 2}

    def tokenizer_identity(self) -> str:
        """The content identity of the tokenizer's files (family.processor, else the base's)."""
        fam = self.suite.family
        return self.input_identity(fam.processor or fam.base, "family.processor" if fam.processor else "family.base")

    def load_model(self, ref: str, field: str):
        """The model of the fused (base) architecture at ref; each family says how to load it."""
        raise NotImplementedError

    def template(self):
        if self._template is None:
            self._template = self.load_model(self.suite.family.base, "family.base").to(self.dtype)
        return self._template

    def held(self, source, copy: bool = False) -> dict[str, Tensor]:
        """A module's (or a state dict's) tensors as the suite holds checkpoints: detached, floating
        entries in its precision (a no-op at float32), on its device, so merges run where the
        models will. copy: never share storage with source (a template that builds models later)."""
        state = source.state_dict() if isinstance(source, torch.nn.Module) else source
        out = {}
        for k, v in state.items():
            v = v.detach()
            t = v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = t.clone() if copy and t is v else t
        return out

    def load_heads(self) -> None:
        """Load every task's head, so the heads travel in a fusion kit (families with heads say how)."""
        if self.HEAD_STATE:
            for task in self.suite.task_names:
                self.head(task)

    def fusion_kit(self) -> "FamilyBase":
        """A copy of this family for the fusion process: it builds models (the template) and applies
        task heads, and holds nothing else, no resolver, no suite file, no data caches, so a method
        handed its build or logits cannot reach an evaluation set through it."""
        template = self.template()
        for holder in (template, getattr(template, "config", None)):  # transformers records the zoo folder it read
            if hasattr(holder, "name_or_path"):
                holder.name_or_path = ""
        self.load_heads()
        kit = object.__new__(type(self))
        kept = ("suite", "device", "dtype", "_template", *self.HEAD_STATE)
        kit.__dict__.update({k: self.__dict__[k] for k in kept})
        kit.resolve, kit.suite_file = NoFiles(), None
        kit.eval_data = kit.resolve.eval_data
        return kit

    def build(self, state):
        """A runnable model that holds `state`'s tensors themselves (load_state_dict with
        assign=True, each cast to the template's dtype): the template is copied without its
        parameters, so no model-sized clone is made only to be overwritten."""
        template = self.template()
        memo = {id(p): torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
                for p in template.parameters()}
        model = copy.deepcopy(template, memo)
        dtypes = {k: v.dtype for k, v in template.state_dict().items()}
        model.load_state_dict({k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()},
                              strict=True, assign=True)
        return model.to(self.device).eval()


HUB_FIX = "download it to the HF cache (see README, 'Real suites'), or point the suite at a local copy"


def load_pretrained(loader: Callable, suite: SuiteSpec, suite_file: Path, resolve: Resolver, ref: str,
                    field: str, **kwargs):
    """loader(resolved, ...) with the suite's revision / safetensors / remote-code policy;
    a model that cannot be found makes the suite unavailable instead of crashing it."""
    fam = suite.family
    resolved = resolve(ref, field)
    try:
        return loader(resolved, revision=revision_for(suite, ref), use_safetensors=None if fam.allow_pickle else True,
                      trust_remote_code=fam.trust_remote_code, **kwargs)
    except OSError as exc:
        raise SuiteUnavailable(f"cannot load model '{ref}': {str(exc).splitlines()[0]}", file=str(suite_file),
                               field=field, fix=HUB_FIX) from None


def load_split(suite: SuiteSpec, suite_file: Path, resolve: Resolver, task: str, split: str):
    """One split of a task's dataset: `save_to_disk` folders and hub ids alike, capped at max_examples."""
    import datasets
    spec = suite.task(task)
    resolved = resolve(spec.dataset, f"tasks[{task}].dataset")
    try:
        if Path(resolved).exists():
            ds = datasets.load_from_disk(resolved)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(resolved, spec.dataset_config, split=split, revision=spec.revision)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError) as exc:
        raise SuiteUnavailable(f"cannot load split '{split}' of dataset '{spec.dataset}': {exc}",
                               file=str(suite_file), field=f"tasks[{task}].dataset",
                               fix="build the zoo, or " + HUB_FIX) from None
    if spec.max_examples is not None and len(ds) > spec.max_examples:
        ds = ds.select(range(spec.max_examples))
    return ds


def content_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_cached(folder: str, name: str, key_obj, build: Callable[[], dict[str, Tensor] | tuple],
                with_metadata: bool = False):
    """Compute tensors once per content key and keep them as safetensors in the fbh cache, carrying
    their digest: a cached file whose bytes changed is refused, never used. build returns the
    tensors, or (tensors, string metadata); with_metadata returns (tensors, metadata)."""
    path = cache_dir() / folder / f"{name}-{content_key(key_obj)}.safetensors"
    if path.is_file():
        tensors, metadata = load_verified(path, what=f"cached {folder} file")
    else:
        built = build()
        tensors, metadata = built if isinstance(built, tuple) else (built, {})
        save_verified(path, tensors, metadata)
    return (tensors, metadata) if with_metadata else tensors


# Tokenised text travels through the harness as one long tensor [N, 2, L]: ids and attention mask,
# so methods slice batches of text exactly as they slice batches of images.
def pack_text(encoding) -> Tensor:
    return torch.stack([torch.as_tensor(encoding["input_ids"]), torch.as_tensor(encoding["attention_mask"])],
                       dim=1).long()


def unpack_text(inputs: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    inputs = inputs.to(device)
    return inputs[:, 0], inputs[:, 1]


def text_columns(suite: SuiteSpec, task: str, ds) -> list[str]:
    spec = suite.task(task)
    return spec.input_columns or [c for c in ds.column_names if c not in (spec.label_column, "idx")]


def refuse_corruption(family, corruption: str | None) -> None:
    if corruption is not None:
        raise FbhError(f"corruptions are image corruptions; family '{family.suite.family.kind}' has no images",
                       file=str(family.suite_file), field="corruptions", fix="remove corruptions from this suite")
