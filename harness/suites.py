"""Is a suite runnable here? Zoo suites always are (fbh builds them); hub suites need
their models and data in the local HuggingFace cache or on disk. Checked offline, without
touching the network, so `fbh suites list` and `fbh submit` answer at once."""

from __future__ import annotations

import importlib.util
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
