"""Lazy, memory-mapped reader of a cached dataset (see :mod:`megatron_sd3.data.shards` for the format).

``ShardedDataset(path, verify="fast", max_open_shards=8)``:

- ``len(ds)``, ``ds[i]`` -> ``{"latents" [C, h, w], "prompt_embeds" [T, D], "pooled_prompt_embeds" [P],
  "mask" [h, w] (only if the sample's shard has masks)}`` as stored (bf16 by default; the trainer casts);
- ``ds.get(i, keys)`` reads only ``keys`` (a pipeline stage reads what it needs);
- ``ds.buckets`` (latent ``(h, w)`` per bucket) and ``ds.bucket_ids`` (int64 per sample) for the sampler;
- ``ds.manifest`` the parsed manifest.

- ``ds.get_batch(indices, keys)`` reads several samples of one bucket straight into stacked tensors (what
  the sampler uses);

Host memory stays bounded: a shard is a safetensors file whose header gives each tensor's byte range, and
only the rows of the requested samples are read (``os.preadv`` into the destination tensor; no mmap views
are handed out, nothing is cached); at most ``max_open_shards`` file descriptors are kept open (LRU).
``verify``: ``"full"`` (size, header and sha256 of every shard up front), ``"fast"`` (size and header),
``None`` (manifest only; each shard's size and header are still checked when it is first opened).
A bad shard raises :class:`~megatron_sd3.data.shards.ShardError` naming the file.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_sd3.data import shards as _shards


class ShardedDataset(torch.utils.data.Dataset):
    def __init__(self, path: str | os.PathLike, verify: str | None = "fast", max_open_shards: int = 8):
        self.root = Path(path)
        if verify == "full":
            self.manifest = _shards.verify(self.root, fast=False)
        elif verify == "fast":
            self.manifest = _shards.verify(self.root, fast=True)
        elif verify is None:
            self.manifest = _shards.load_manifest(self.root)
        else:
            raise ValueError(f"verify must be 'full', 'fast' or None, got {verify!r}")
        m = self.manifest
        self.entries = m["shards"]
        self.buckets = [tuple(b) for b in m["latent_buckets"]]
        self._starts = [0]
        for e in self.entries:
            self._starts.append(self._starts[-1] + e["num_samples"])
        self.num_samples = self._starts[-1]
        self.bucket_ids = np.concatenate(
            [np.full(e["num_samples"], e["bucket"], dtype=np.int64) for e in self.entries]
        ) if self.entries else np.zeros(0, dtype=np.int64)
        self.max_open_shards = max(1, int(max_open_shards))
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):  # picklable for DataLoader workers: handles are reopened lazily
        d = self.__dict__.copy()
        d["_handles"], d["_lock"] = OrderedDict(), None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, row in the shard) of global sample ``i``."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def _handle(self, s: int) -> "_ShardReader":
        with self._lock:
            h = self._handles.get(s)
            if h is not None:
                self._handles.move_to_end(s)
                return h
            entry = self.entries[s]
            if s not in self._checked:
                _shards.check_shard(self.root, entry, full=False)
                self._checked.add(s)
            h = _ShardReader(self.root / entry["file"], entry["num_samples"])
            self._handles[s] = h
            while len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)  # its fd closes once no reader still uses it
            return h

    def get(self, i: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` (only ``keys`` if given), as freshly allocated tensors (no view into any file)."""
        s, row = self.locate(int(i))
        h = self._handle(s)
        return {k: h.read(k, [row])[0] for k in h.names if keys is None or k in keys}

    def get_batch(self, indices: Sequence[int], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Samples ``indices`` stacked (they must share one bucket), read straight into the batch tensors.

        ``mask`` is present when any of them has one (all-ones for the others)."""
        locs = [self.locate(int(i)) for i in indices]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, (s, row) in enumerate(locs):
            by_shard.setdefault(s, []).append((pos, row))
        readers = {s: self._handle(s) for s in by_shard}
        names = []
        for r in readers.values():
            names += [k for k in r.names if (keys is None or k in keys) and k not in names]
        out = {}
        for k in names:
            ref = next(r for r in readers.values() if k in r.names)
            shape, dtype = ref.shapes[k], ref.dtypes[k]
            if k == "mask":
                buf = torch.ones((len(locs), *shape), dtype=dtype)
            else:
                buf = torch.empty((len(locs), *shape), dtype=dtype)
            for s, rows in by_shard.items():
                r = readers[s]
                if k not in r.names:
                    if k == "mask":
                        continue
                    raise _shards._damaged(r.path, f"has no tensor {k!r}")
                if r.shapes[k] != shape or r.dtypes[k] != dtype:
                    raise ValueError(f"samples {list(indices)} mix shapes/dtypes of {k!r} (different buckets?)")
                r.read_into(k, rows, buf)
            out[k] = buf
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.get(i)

    @property
    def text_len(self) -> int:
        return int(self.manifest["text_len"])


_ST_TO_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class _ShardReader:
    """Positional reads (``os.preadv``) of single rows of a safetensors shard: only the bytes of the requested
    samples are read, straight into the destination tensor. (Reading via ``safe_open`` + mmap views works too,
    but page-faulting a mapping is about 10x slower than ``preadv`` on the VMs measured.)"""

    def __init__(self, path: Path, num_samples: int):
        self.path = path
        header = _shards.read_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        self.shapes, self.dtypes, self._off, self._row = {}, {}, {}, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = list(info["shape"])
            if not shape or shape[0] != num_samples or info["dtype"] not in _ST_TO_TORCH:
                raise _shards._damaged(path, f"tensor {name!r} has shape {shape} / dtype {info['dtype']}")
            b, e = info["data_offsets"]
            self.shapes[name], self.dtypes[name] = tuple(shape[1:]), _ST_TO_TORCH[info["dtype"]]
            self._off[name], self._row[name] = base + b, (e - b) // num_samples
        self.names = list(self.shapes)
        self._fd = os.open(path, os.O_RDONLY)

    def read_into(self, name: str, rows: list[tuple[int, int]], out: torch.Tensor):
        """``out[pos] = row`` for each ``(pos, row)``."""
        nbytes = self._row[name]
        flat = out.view(-1).view(torch.uint8).view(out.shape[0], -1)
        for pos, row in rows:
            mv = memoryview(flat[pos].numpy())
            got = os.preadv(self._fd, [mv], self._off[name] + row * nbytes)
            if got != nbytes:
                raise _shards._damaged(self.path, f"short read of {name!r} row {row} (truncated?)")

    def read(self, name: str, rows: list[int]) -> torch.Tensor:
        out = torch.empty((len(rows), *self.shapes[name]), dtype=self.dtypes[name])
        self.read_into(name, list(enumerate(rows)), out)
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
