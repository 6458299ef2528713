"""Is a suite runnable here? Zoo suites always are (fbh builds them); hub suites need
their models and data in the local HuggingFace cache or on disk."""

from __future__ import annotations

from pathlib import Path

from harness.sources import ZOO_PREFIX, Resolver
from harness.spec import SuiteSpec


def _in_hf_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import scan_cache_dir
    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache dir yet, or an unreadable one
        return False


def missing_refs(spec: SuiteSpec, file: Path) -> list[str]:
    resolve = Resolver(file, None)
    refs = [("model", spec.family.base)] + [("model", r) for r in spec.family.experts.values()]
    refs += [("dataset", t.dataset) for t in spec.tasks]
    missing = []
    for kind, ref in refs:
        if ref.startswith(ZOO_PREFIX):
            continue
        resolved = resolve(ref)
        if Path(resolved).exists():
            continue
        if not _in_hf_cache(resolved, kind):
            missing.append(ref)
    return missing


def availability(spec: SuiteSpec, file: Path) -> tuple[str, str]:
    if spec.family.zoo is not None:
        from harness.zoo import is_built, zoo_path
        built = is_built(zoo_path(spec.family.zoo.builder, spec.family.zoo.recipe))
        return ("available", "zoo built" if built else "zoo builds offline on first use")
    missing = missing_refs(spec, file)
    if missing:
        return ("unavailable", f"{len(missing)} model/data refs not found locally (e.g. {missing[0]}); "
                               "the HF hub is unreachable here")
    return ("available", "all refs found locally")
