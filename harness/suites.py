"""Is a suite runnable here? Zoo suites always are (fbh builds them); hub suites need
their models and data in the local HuggingFace cache or on disk. Checked offline, without
touching the network, so `fbh suites list` and `fbh submit` answer at once."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.errors import SuiteUnavailable
from harness.sources import ZOO_PREFIX, Resolver
from harness.spec import SuiteSpec

REAL_SUITES_FIX = ("download its models and datasets on a machine with hub access (README, 'Real suites'), "
                   "or point the suite at local copies")


@lru_cache(maxsize=1)
def _hf_cached_repos() -> frozenset[tuple[str, str]]:
    from huggingface_hub import constants, scan_cache_dir
    try:  # constants read now, as hf_hub_download reads them, so HF_HUB_CACHE changes are seen
        return frozenset((r.repo_type, r.repo_id) for r in scan_cache_dir(constants.HF_HUB_CACHE).repos)
    except Exception:  # no cache dir yet, or an unreadable one
        return frozenset()


def missing_refs(spec: SuiteSpec, file: Path) -> list[str]:
    resolve = Resolver(file, None)
    refs = [("model", spec.family.base)] + [("model", r) for r in spec.family.experts.values()]
    refs += [("dataset", t.dataset) for t in spec.tasks]
    _hf_cached_repos.cache_clear()
    missing = []
    for kind, ref in refs:
        if ref.startswith(ZOO_PREFIX) or ref in missing:
            continue
        resolved = resolve(ref)
        if not Path(resolved).exists() and (kind, resolved) not in _hf_cached_repos():
            missing.append(ref)
    return missing


def missing_library(spec: SuiteSpec) -> tuple[str, str] | None:
    """(module, install hint) when the suite's family needs an optional library that is not installed."""
    from harness.families import OPTIONAL_LIBRARIES
    need = OPTIONAL_LIBRARIES.get(spec.family.kind)
    if need is not None and importlib.util.find_spec(need[0]) is None:
        return need
    return None


def availability(spec: SuiteSpec, file: Path) -> tuple[str, str]:
    library = missing_library(spec)
    if library is not None:
        return ("unavailable", f"needs {library[0]}: {library[1]}")
    if spec.family.zoo is not None:
        from harness.zoo import is_built, zoo_path
        built = is_built(zoo_path(spec.family.zoo.builder, spec.family.zoo.recipe))
        return ("available", "zoo built" if built else "zoo builds offline on first use")
    missing = missing_refs(spec, file)
    if missing:
        return ("unavailable", f"{len(missing)} model/data refs not found locally (e.g. {missing[0]})")
    return ("available", "all refs found locally")


def require_available(spec: SuiteSpec, file: Path) -> None:
    """Raise SuiteUnavailable naming the suite and what is missing, before any work starts."""
    library = missing_library(spec)
    if library is not None:
        raise SuiteUnavailable(f"suite '{spec.name}' is unavailable: its family '{spec.family.kind}' needs "
                               f"the '{library[0]}' package, not installed here", file=str(file), fix=library[1])
    if spec.family.zoo is not None:
        return
    missing = missing_refs(spec, file)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SuiteUnavailable(f"suite '{spec.name}' is unavailable: '{missing[0]}'{more} not found locally "
                               "(no local path, not in the HuggingFace cache)", file=str(file),
                               fix=REAL_SUITES_FIX)


# ----------------------------------------------------------------------------- fbh suites check
# Every input a suite reads, where it is on this machine, and how to fetch what is missing: the
# answer to "can this suite run here, and if not, what do I download?", offline.

WEIGHTS = ("*.safetensors",)
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")
TOKENIZER = ("tokenizer.json", "vocab.json", "spiece.model")  # fast, BPE (CLIP, GPT-2) or sentencepiece (T5)
HUB_DATA = ("*.parquet", "**/*.parquet", "*.arrow", "**/*.arrow")
SAVED_DATA = ("dataset_dict.json", "state.json")  # datasets' save_to_disk folders


@dataclass(frozen=True)
class InputCheck:
    """One model or dataset input of a suite, as found on this machine."""
    field: str                      # where the suite names it, e.g. family.experts.eurosat
    ref: str                        # the hub id or path as written
    repo_type: str                  # 'model' or 'dataset'
    revision: str | None            # the pin, else the commit the local HF cache resolves, else None
    pinned: bool
    expected: tuple[tuple[str, ...], ...]  # files the family reads: each group is satisfied by any one pattern
    location: str | None            # the local folder or file (HF snapshot or path), None when absent
    missing: tuple[str, ...]        # expected groups not found at location, as 'a|b'
    fetch: str | None               # the command that fetches it; None for local paths

    @property
    def present(self) -> bool:
        return self.location is not None and not self.missing


@dataclass(frozen=True)
class SuiteCheck:
    name: str
    inputs: list[InputCheck]
    blocker: str | None             # what stops the suite regardless of its inputs (a missing library)
    note: str | None                # e.g. that a zoo builds offline

    @property
    def runnable(self) -> bool:
        return self.blocker is None and all(i.present for i in self.inputs)

    def fetch_commands(self) -> list[str]:
        return list(dict.fromkeys(i.fetch for i in self.inputs if not i.present and i.fetch))


def expected_files(spec: SuiteSpec, field: str, repo_type: str, local: bool) -> tuple[tuple[str, ...], ...]:
    """What the family loads from one input: config and weights for a model (safetensors unless the
    suite allows pickles), the tokenizer and image processor where the base provides them, data files."""
    if repo_type == "dataset":
        return (SAVED_DATA,) if local else (HUB_DATA,)
    fam = spec.family
    weights = WEIGHTS + (PICKLED_WEIGHTS if fam.allow_pickle else ())
    if fam.kind == "open_clip_vision":
        return (weights,)  # open_clip's folders and single checkpoint files differ; weights are what all share
    groups = [("config.json", "adapter_config.json"), weights]  # adapter: a LoRA expert (peft)
    provides_text = field == ("family.processor" if fam.processor else "family.base")
    if provides_text and fam.kind in ("gpt2_classification", "flan_t5"):
        groups.append(TOKENIZER)
    if provides_text and fam.kind == "clip_vision":
        groups.append(("preprocessor_config.json",))
        if fam.heads == "zero_shot":
            groups.append(TOKENIZER)
    if field == "family.processor":
        groups = groups[2:]  # a processor-only reference needs no weights
    return tuple(groups)


def _found(location: Path, group: tuple[str, ...]) -> bool:
    if location.is_file():
        return True  # a single-file input (heads, an open_clip checkpoint) is its own content
    return any(next(location.glob(pattern), None) is not None for pattern in group)


def _hub_snapshot(repo_id: str, repo_type: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub repo at revision (a pin, else refs/main), offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def hf_download_command(repo_id: str, repo_type: str, revision: str | None) -> str:
    return (f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
            + (f" --revision {revision}" if revision else ""))


def check_input(spec: SuiteSpec, file: Path, field: str, ref: str, repo_type: str) -> InputCheck:
    from harness.identity import revision_for
    resolved = Resolver(file, None)(ref, field)
    pin = revision_for(spec, ref, repo_type)
    local = ref.startswith(("/", "./", "../"))
    if local:
        location = Path(resolved) if Path(resolved).exists() else None
        revision, fetch = None, None
    else:
        location = _hub_snapshot(resolved, repo_type, pin)
        revision = pin or (location.name if location is not None else None)
        fetch = hf_download_command(resolved, repo_type, pin)
    expected = expected_files(spec, field, repo_type, local)
    missing = tuple("|".join(g) for g in expected if location is None or not _found(location, g))
    return InputCheck(field, ref, repo_type, revision, pin is not None, expected,
                      str(location) if location is not None else None, missing, fetch)


def check_suite(spec: SuiteSpec, file: Path) -> SuiteCheck:
    """Every model and dataset the suite reads, checked offline against local paths and the HF cache."""
    from harness.identity import model_refs
    library = missing_library(spec)
    blocker = f"needs the '{library[0]}' package: {library[1]}" if library else None
    note = None
    if spec.family.zoo is not None:
        note = "its zoo (models and data under zoo://) builds offline on first use: `fbh zoo build`"
    seen, inputs = set(), []
    for field, ref, repo_type in model_refs(spec):
        if ref.startswith(ZOO_PREFIX) or (ref, repo_type) in seen:
            continue
        seen.add((ref, repo_type))
        inputs.append(check_input(spec, file, field, ref, repo_type))
    return SuiteCheck(spec.name, inputs, blocker, note)


# ----------------------------------------------------------------------------- the kind of each local input
# `fbh validate` and `fbh submit` check, before anything is written, that every local path a suite
# names is the kind of thing its field needs: a model folder (config and safetensors weights), a
# weights file, a heads file, a datasets folder. Without this, `/etc` as a base, `/etc/passwd` as a
# dataset or a pickled expert failed only once the family loaded them, after the submission's and
# the suite's rows were written. Zoo inputs are built by fbh and checked against their manifest. Hub
# inputs are not looked into here (planning only finds their snapshot's commit): the families refuse
# a pickle-only hub snapshot when they load it.

MODEL_FOLDER_FIX = "point it at a save_pretrained folder (config.json and *.safetensors weights)"
DATASET_FIX = "point it at a folder written by datasets' save_to_disk"
WEIGHTS_FILE_FIX = "point it at a .safetensors file"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_FIX = "convert it to safetensors (safetensors.torch.save_file), or set family.allow_pickle: true " \
             "if you trust its author (a pickle runs code when it is loaded)"


def local_input_problem(spec: SuiteSpec, field: str, repo_type: str, path: Path) -> tuple[str, str] | None:
    """(what is wrong, fix) when the existing local `path` is not the kind of input `field` needs."""
    fam = spec.family
    if repo_type == "dataset":
        return _dataset_problem(path)
    if field == "family.heads":
        return _weights_file_problem(path, pickles="never")  # the families read heads with safetensors only
    if fam.kind == "open_clip_vision" and (field.startswith("family.experts.") or field == "references.mtl"):
        return _weights_file_problem(path, pickles="allowed" if fam.allow_pickle else "opt-in")
    return _model_folder_problem(spec, field, path)


def _dataset_problem(path: Path) -> tuple[str, str] | None:
    if not path.is_dir():
        return "is not a folder, so not a dataset folder", DATASET_FIX
    if not any((path / name).is_file() for name in SAVED_DATA):
        return f"is not a datasets folder (no {' or '.join(SAVED_DATA)})", DATASET_FIX
    return None


def _weights_file_problem(path: Path, pickles: str) -> tuple[str, str] | None:
    """pickles: 'allowed' (family.allow_pickle is set), 'opt-in' (it could be) or 'never'."""
    if not path.is_file():
        return "is not a regular file, but this field names one weights file", WEIGHTS_FILE_FIX
    if path.suffix in PICKLE_SUFFIXES and pickles == "allowed":
        return None
    if path.suffix in PICKLE_SUFFIXES and pickles == "opt-in":
        return "is a pickle checkpoint", PICKLE_FIX
    if path.suffix != ".safetensors":
        return f"is not a .safetensors file ({path.name})", WEIGHTS_FILE_FIX
    return None


def _model_folder_problem(spec: SuiteSpec, field: str, path: Path) -> tuple[str, str] | None:
    fam = spec.family
    if not path.is_dir():
        if path.suffix in PICKLE_SUFFIXES:
            return "is a pickle checkpoint file, not a model folder", PICKLE_FIX if not fam.allow_pickle \
                else MODEL_FOLDER_FIX
        return "is a file, not a model folder", MODEL_FOLDER_FIX
    open_clip = fam.kind == "open_clip_vision"
    weights = WEIGHTS + (PICKLED_WEIGHTS if fam.allow_pickle else ())
    groups = (("open_clip_config.json",), weights) if open_clip else expected_files(spec, field, "model", local=True)
    for group in groups:
        if _found(path, group):
            continue
        if set(group) & set(WEIGHTS) and any(_found(path, (p,)) for p in PICKLED_WEIGHTS):
            return "holds only pickle weights (*.bin / *.pt)", PICKLE_FIX
        fix = (f"point it at the folder of the processor's files ({' or '.join(group)})"
               if field == "family.processor" else MODEL_FOLDER_FIX)
        return f"is not a model folder: it has no {' or '.join(group)}", fix
    return None


def hub_pickle_problem(spec: SuiteSpec, ref: str) -> tuple[str, str] | None:
    """A hub model whose snapshot in the local cache holds pickle weights only, while the suite does not
    allow pickles (a model not downloaded yet is the availability check's to report)."""
    from harness.identity import revision_for
    if spec.family.allow_pickle:
        return None
    snapshot = _hub_snapshot(ref, "model", revision_for(spec, ref))
    if snapshot is not None and not _found(snapshot, WEIGHTS) and _found(snapshot, PICKLED_WEIGHTS):
        return f"holds only pickle weights in its local snapshot ({snapshot.name})", PICKLE_FIX
    return None


def check_local_inputs(spec: SuiteSpec, file: Path) -> None:
    """Raise FbhError (file, field, fix) for the first local input that is not the kind its field needs,
    or hub model whose downloaded snapshot is pickles only."""
    from harness.errors import FbhError
    from harness.identity import model_refs
    resolve = Resolver(file, None)
    for field, ref, repo_type in model_refs(spec):
        if ref.startswith(ZOO_PREFIX):
            continue
        if not ref.startswith(("/", "./", "../")):
            problem = hub_pickle_problem(spec, ref) if repo_type == "model" else None
            if problem:
                raise FbhError(f"hub model '{ref}' {problem[0]}", file=str(file), field=field, fix=problem[1])
            continue
        try:
            path = Path(resolve(ref, field))
            problem = local_input_problem(spec, field, repo_type, path) if path.exists() else None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            problem = (f"cannot be read ({getattr(exc, 'strerror', None) or exc})",
                       "check the path, its links and its permissions")
        if problem:
            raise FbhError(f"'{ref}' {problem[0]}", file=str(file), field=field, fix=problem[1])
