"""What a suite's numbers are computed on: the identity of every model and data input, and the
suite's fingerprint over them.

An input's identity is content, never a name: a built zoo is its manifest digest (sha256 over
every weight, head and data file, written at build time), a hub model or dataset is the commit
of its snapshot in the local HuggingFace cache, a local file or folder is the digest of its
bytes. The fingerprint hashes those identities with the parts of the suite spec that shape
results (not its title, description, published rows or budget). Every run stores the
fingerprint it was computed on; rankings only compare rows that share one.

Torch-free: planning computes fingerprints before deciding what to run.
"""

from __future__ import annotations

from pathlib import Path

from harness.digests import file_sha256, json_digest, manifest_digest, tree_manifest
from harness.errors import FbhError, SuiteUnavailable
from harness.sources import ZOO_PREFIX, Resolver
from harness.spec import SuiteSpec

# Suite fields that say how to present or schedule results, not what they are.
PRESENTATION_FIELDS = ("title", "description", "default", "fusion_budget_seconds")
ZERO_SHOT = "zero_shot"  # family.heads computed from the base model: no input of its own


def shaping_spec(suite: SuiteSpec) -> dict:
    """The suite spec less what does not shape a number: presentation, published rows, and the pins
    (a pinned zoo digest or hub commit is checked, and what was really read is in the inputs)."""
    spec = suite.model_dump(mode="json")
    for name in PRESENTATION_FIELDS:
        spec.pop(name, None)
    spec["references"] = {k: v for k, v in spec["references"].items() if k != "published"}
    for name in ("revision", "revisions"):
        spec["family"].pop(name, None)
    if spec["family"].get("zoo"):
        spec["family"]["zoo"].pop("digest", None)
        spec["family"]["zoo"].pop("built_with", None)
    for task in spec["tasks"]:
        task.pop("revision", None)
    return spec


def fingerprint(suite: SuiteSpec, inputs: dict[str, str]) -> str:
    """'fp-' and 16 hex digits: short enough to read on a page, long enough never to collide."""
    return "fp-" + json_digest({"suite": shaping_spec(suite), "inputs": inputs})[7:23]


def model_refs(suite: SuiteSpec) -> list[tuple[str, str, str]]:
    """(field, reference, repo type) of every model and data input the suite reads."""
    fam = suite.family
    refs = [("family.base", fam.base, "model")]
    refs += [(f"family.experts.{t}", r, "model") for t, r in fam.experts.items()]
    if fam.heads and fam.heads != ZERO_SHOT:
        refs.append(("family.heads", fam.heads, "model"))
    if fam.processor:
        refs.append(("family.processor", fam.processor, "model"))
    if suite.references.mtl:
        refs.append(("references.mtl", suite.references.mtl, "model"))
    refs += [(f"tasks[{i}].dataset", t.dataset, "dataset") for i, t in enumerate(suite.tasks)]
    return refs


def revision_for(suite: SuiteSpec, ref: str, repo_type: str = "model") -> str | None:
    """The hub revision a suite pins for one model or dataset reference, if any."""
    if repo_type == "dataset":
        return next((t.revision for t in suite.tasks if t.dataset == ref and t.revision), None)
    return suite.family.revisions.get(ref) or suite.family.revision


def resolve_inputs(suite: SuiteSpec, file: Path, zoo_dir: Path | None) -> dict[str, str]:
    """Reference -> content identity of everything the suite reads, as found on this machine."""
    if suite.family.zoo is not None:
        from harness.zoo import zoo_digest
        if zoo_dir is None:
            raise FbhError("a zoo suite's inputs are known once its zoo is built", file=str(file),
                           field="family.zoo", fix=f"run `fbh zoo build {suite.name}`")
        out = {"zoo": zoo_digest(zoo_dir)}
        refs = [(f, r, k) for f, r, k in model_refs(suite) if not r.startswith(ZOO_PREFIX)]
    else:
        out, refs = {}, model_refs(suite)
    resolve = Resolver(file, zoo_dir)
    for field, ref, repo_type in refs:
        if ref not in out:
            out[ref] = input_identity(resolve(ref, field), suite, ref, repo_type, file, field)
    return dict(sorted(out.items()))


MAX_INPUT_FILES = 10_000  # a model or dataset folder; more is a folder that is neither (e.g. /etc)


def input_identity(resolved: str, suite: SuiteSpec, ref: str, repo_type: str, file: Path, field: str) -> str:
    path = Path(resolved)
    try:
        if path.is_file():
            return file_sha256(path)
        if path.is_dir():
            files = 0
            for _ in path.rglob("*"):
                files += 1
                if files > MAX_INPUT_FILES:
                    raise FbhError(f"'{ref}' is a folder of more than {MAX_INPUT_FILES} entries, not a model or "
                                   "dataset folder", file=str(file), field=field,
                                   fix="point it at a save_pretrained / save_to_disk folder")
            return manifest_digest(tree_manifest(path))
    except OSError as exc:
        raise FbhError(f"cannot read '{ref}': {exc.strerror or exc}", file=str(file), field=field,
                       fix="check the path and its permissions") from None
    return "hub:" + hub_commit(resolved, repo_type, revision_for(suite, ref, repo_type), file, field)


def hub_commit(repo_id: str, repo_type: str, revision: str | None, file: Path, field: str) -> str:
    """The commit of a hub repo's snapshot in the local cache (offline); the pinned revision when given."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        snapshot = snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        at = f" at revision {revision}" if revision else ""
        raise SuiteUnavailable(f"{repo_type} '{repo_id}'{at} is not in the local HuggingFace cache "
                               f"({type(exc).__name__})", file=str(file), field=field,
                               fix=f"download it: hf download {repo_id}"
                                   + (" --repo-type dataset" if repo_type == "dataset" else "")
                                   + (f" --revision {revision}" if revision else "")) from None
    commit = Path(snapshot).name
    if revision and len(revision) == 40 and commit != revision:
        raise FbhError(f"{repo_type} '{repo_id}' resolved to commit {commit}, but the suite pins {revision}",
                       file=str(file), field=field, fix="download the pinned revision, or update the pin")
    return f"{repo_id}@{commit}"


def expected_inputs(suite: SuiteSpec) -> dict[str, str] | None:
    """The inputs the suite file pins, when it pins every one (a zoo digest, hub commits); else None."""
    out: dict[str, str] = {}
    refs = model_refs(suite)
    if suite.family.zoo is not None:
        pinned = getattr(suite.family.zoo, "digest", None)
        if pinned is None:
            return None
        out["zoo"] = pinned
        refs = [(f, r, k) for f, r, k in refs if not r.startswith(ZOO_PREFIX)]
    for _, ref, repo_type in refs:
        revision = revision_for(suite, ref, repo_type)
        if ref.startswith(("/", "./", "../")) or not revision or len(revision) != 40:
            return None  # a local path, or a hub ref without a pinned commit
        out[ref] = f"hub:{ref}@{revision}"
    return dict(sorted(out.items()))


def expected_fingerprint(suite: SuiteSpec) -> str | None:
    pinned = expected_inputs(suite)
    return None if pinned is None else fingerprint(suite, pinned)
