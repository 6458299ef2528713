"""Streaming state dicts: read one tensor at a time from safetensors files.

A `LazyStateDict` is a read-only Mapping over one or more .safetensors files that reads
a tensor from disk on every access and keeps nothing. A merge written entry by entry
(harness.tensors.map_entries over ctx.base, reading e[key] of each expert) therefore
holds one tensor per expert plus its output, so its peak memory does not grow with the
number of experts.

Why not safetensors.safe_open: its tensors are views of a private mmap of the whole
file, and every page a merge touches stays mapped (and counted as resident) until the
file is closed, so resident memory grows with the number of experts. Here each tensor is
read with one positioned read into a fresh buffer: one copy from the page cache, the
same cost as reading the bytes at all. The file layout is safetensors' documented
format: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int      # absolute byte offset in the file
    nbytes: int


def read_header(path: str | Path) -> dict[str, Entry]:
    """Tensor name -> where its bytes lie, from one safetensors file's header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = Entry(str(path), SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin,
                          end - begin)
    return out


def read_exactly(fd: int, into: Tensor, offset: int, path: str) -> None:
    """Fill the contiguous 1-D CPU tensor `into` with the file's bytes from `offset`: positioned
    reads, so forked or threaded readers can share one descriptor."""
    # numpy's view of a float32 or byte tensor is the cheapest buffer to hand the kernel (a
    # chunked merge reads thousands of pieces); other dtypes go through their bytes.
    array = (into if into.dtype in (torch.float32, torch.uint8) else into.view(torch.uint8)).numpy()
    done = os.preadv(fd, [array], offset)
    if done < array.nbytes:  # a single read returns at most ~2 GiB on Linux
        view = memoryview(array).cast("B")
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise OSError(f"{path}: file ends before tensor data at byte {offset + done}")
            done += n


def read_tensor(entry: Entry, fd: int | None = None, pinned: bool = False) -> Tensor:
    """One tensor, read into a fresh (writable, unshared) buffer; pinned: in page-locked memory,
    from which a copy to a GPU runs at full speed and asynchronously."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=pinned)
    if fd is None:
        with open(entry.path, "rb", buffering=0) as f:
            read_exactly(f.fileno(), buf, entry.start, entry.path)
    else:
        read_exactly(fd, buf, entry.start, entry.path)
    if entry.dtype == torch.uint8:
        return buf.reshape(entry.shape)
    return buf.view(entry.dtype).reshape(entry.shape)


def safetensors_files(model_dir: str | Path) -> list[Path] | None:
    """The weight files of a save_pretrained folder (single or sharded), or None if it has none."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    return None


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are read from safetensors files on each access.

    keys: the entries and their order (default: the files' order); every key must be in
    the files. dtypes: per-key dtype to cast to on access (so a lazy checkpoint matches a
    model loaded in another dtype). device: where returned tensors live.
    """

    # Every access returns a new tensor nobody else holds: callers may modify it in place
    # (harness.tensors.writable_float).
    fresh_tensors = True

    def __init__(self, files: list[str | Path] | str | Path, keys: list[str] | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None, device: torch.device | str = "cpu"):
        files = [files] if isinstance(files, (str, Path)) else list(files)
        index: dict[str, Entry] = {}
        for f in files:
            index.update(read_header(f))
        if keys is not None:
            missing = [k for k in keys if k not in index]
            if missing:
                raise KeyError(f"entries {missing[:3]} are not in {[str(f) for f in files]}")
            index = {k: index[k] for k in keys}
        self._index = index
        self._dtypes = dict(dtypes or {})
        self.device = torch.device(device)
        self._fds: dict[str, int] = {}
        self._float32_slices = frozenset(
            k for k, e in index.items()
            if self.device.type == "cpu" and e.dtype == torch.float32 and self._dtypes.get(k, e.dtype) == torch.float32)

    def _fd(self, path: str) -> int:
        # Kept open: a chunked merge reads each tensor in many small pieces, from several
        # threads (dict.setdefault is atomic, so two first reads keep one descriptor).
        fd = self._fds.get(path)
        if fd is None:
            opened = os.open(path, os.O_RDONLY)
            fd = self._fds.setdefault(path, opened)
            if fd != opened:
                os.close(opened)
        return fd

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}  # descriptors do not travel to another process

    def __getitem__(self, key: str) -> Tensor:
        entry = self._index[key]
        on_gpu = self.device.type == "cuda"
        t = read_tensor(entry, self._fd(entry.path), pinned=on_gpu)
        # The cast runs on the target device: a GPU casts as it receives, the CPU is spared it.
        return t.to(device=self.device, non_blocking=on_gpu).to(self._dtypes.get(key, t.dtype))

    def identity(self) -> str:
        """Which weights these are, for caching what they compute: the content digest of each file
        (never its path or modification time: a file rewritten in place is other weights), the
        entries read and the dtypes they are read in."""
        from harness.digests import file_sha256
        files = sorted({e.path for e in self._index.values()})
        blob = json.dumps([[file_sha256(f) for f in files], list(self._index),
                           {k: str(v) for k, v in self._dtypes.items()}])
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def reads_float32_slices(self, key: str) -> bool:
        """Whether read_slice can serve `key`: a float32 entry returned on CPU without a cast."""
        return key in self._float32_slices

    def read_slice(self, key: str, start: int, out: Tensor) -> Tensor:
        """Elements [start, start + out.numel()) of the flattened float32 entry, read into `out`
        (1-D, contiguous, float32, CPU): one piece of a tensor without reading the rest."""
        entry = self._index[key]
        if not self.reads_float32_slices(key) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"read_slice serves float32 entries into float32 buffers on CPU; '{key}' is {entry.dtype}")
        if start < 0 or (start + out.numel()) * 4 > entry.nbytes:
            raise IndexError(f"elements {start}..{start + out.numel()} are outside '{key}' {entry.shape}")
        read_exactly(self._fd(entry.path), out, entry.start + 4 * start, entry.path)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `self[key]` will have, without reading it."""
        return self._dtypes.get(key, self._index[key].dtype)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    def copy(self) -> dict[str, Tensor]:
        """A materialised plain dict (what dict.copy() gives for an eager state dict)."""
        return dict(self.items())

    def __repr__(self) -> str:
        files = sorted({e.path for e in self._index.values()})
        return f"LazyStateDict({len(self)} tensors from {files})"
