"""Content digests: what every stored number and cached file is identified and verified by.

A file's digest is the sha256 of its bytes. Hashing a model is a full read, so the digest of
a file is remembered against its stat identity (device, inode, size, mtime and ctime, the
last of which no user call can set back): a file rewritten in place, even with its mtime
restored, is hashed again, and an unchanged one costs one stat. Cache files fbh writes carry
the digest of their tensors in their own metadata and are checked when read: hashed once per
process, then again only when the file's stat identity moves.

Torch-free except `tensors_digest` / `save_verified` / `load_verified`, which import it lazily,
so planning can ask for digests without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harness.errors import FbhError

DIGEST_KEY = "fbh_sha256"  # safetensors metadata field holding the digest of the file's tensors
_memo: dict[str, tuple[tuple, str]] = {}
_verified: dict[str, tuple] = {}  # cache file -> the stat identity it had when this process verified it


class CorruptFile(FbhError):
    """A stored or cached file whose bytes are not the ones it was written with."""


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_file(path: Path) -> Path:
    from harness.paths import cache_dir
    return cache_dir() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def file_sha256(path: str | Path) -> str:
    """'sha256:<hex>' of a file's bytes; recomputed only when its stat identity changed."""
    path = Path(path).resolve()
    key = _stat_key(path)
    hit = _memo.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    memo = _memo_file(path)
    try:
        stored = json.loads(memo.read_text())
        if tuple(stored["stat"]) == key:
            _memo[str(path)] = (key, stored["sha256"])
            return stored["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    if _stat_key(path) == key:  # not changed while we read it
        _memo[str(path)] = (key, digest)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "stat": list(key), "sha256": digest}))
            tmp.rename(memo)
        except OSError:
            pass  # the memo only saves time; a read-only cache still verifies
    return digest


def tree_files(root: str | Path) -> list[Path]:
    """Every regular file below root, in a stable order (relative POSIX paths sorted)."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def tree_manifest(root: str | Path, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file below root, except top-level names in exclude."""
    root = Path(root)
    out = {}
    for p in tree_files(root):
        rel = p.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in exclude:
            continue
        out[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def manifest_digest(manifest: dict[str, dict[str, Any]]) -> str:
    """One digest of a whole tree: over its sorted (path, file digest) pairs."""
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(f"{rel}\0{manifest[rel]['sha256']}\n".encode())
    return "sha256:" + h.hexdigest()


def verify_manifest(root: str | Path, manifest: dict[str, dict[str, Any]], *, what: str, fix: str) -> None:
    """Every file of the manifest is there with its size and digest (sizes first: a cheap early no)."""
    root = Path(root)
    for rel, info in sorted(manifest.items()):
        path = root / rel
        if not path.is_file():
            raise CorruptFile(f"{what} is missing '{rel}'", file=str(path), fix=fix)
        if path.stat().st_size != info["size"]:
            raise CorruptFile(f"{what}: '{rel}' is {path.stat().st_size} bytes, {info['size']} were written",
                              file=str(path), fix=fix)
    for rel, info in sorted(manifest.items()):
        got = file_sha256(root / rel)
        if got != info["sha256"]:
            raise CorruptFile(f"{what}: '{rel}' does not have the content it was built with "
                              f"(digest {got[:19]}..., expected {info['sha256'][:19]}...)", file=str(root / rel),
                              fix=fix)


def json_digest(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- self-verifying cache files

def tensors_digest(tensors) -> str:
    """Digest of a dict of tensors: names, dtypes, shapes and bytes, in name order."""
    import torch
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def save_verified(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a cache file atomically (readers see it whole or not at all), carrying its tensors' digest."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.rename(path)


def load_verified(path: Path, *, what: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a file save_verified wrote; a file whose tensors are not the ones
    written, or that carries no digest, is refused with the fix (delete it; fbh recomputes it)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    fix = f"delete it (rm '{path}'); fbh recomputes it on the next run"
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFile(f"{what} cannot be read: {exc}", file=str(path), fix=fix) from None
    expected = metadata.pop(DIGEST_KEY, None)
    key = _stat_key(Path(path))
    if _verified.get(str(path)) == key and expected is not None:
        return tensors, metadata  # verified in this process, and not written since (its ctime would move)
    if expected is None or tensors_digest(tensors) != expected:
        raise CorruptFile(f"{what} does not hold the tensors it was written with"
                          + (" (it carries no digest)" if expected is None else ""), file=str(path), fix=fix)
    _verified[str(path)] = key
    return tensors, metadata
