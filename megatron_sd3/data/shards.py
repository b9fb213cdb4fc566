"""Shard and manifest format of a cached dataset, plus ``verify``.

A dataset directory holds::

    manifest.json                   # written last, by rank 0 of the preprocessing
    shards/u000012-b01.safetensors  # work unit 12, bucket 1
    units/u000012.json              # per-unit completion record (restart + manifest merge)
    preprocess_config.json          # fingerprint of the settings (a restart with other settings is refused)

A shard is one safetensors file (memory-mapped on read, no pickles) whose samples all share one bucket:
``latents`` ``[N, C, h, w]``, ``prompt_embeds`` ``[N, T, D]``, ``pooled_prompt_embeds`` ``[N, P]`` and, when
the shard has masks, ``mask`` ``[N, h, w]`` (samples without a mask file get an all-ones mask there).
Its safetensors metadata holds the ``sources`` and ``captions`` of its samples (JSON lists).

``manifest.json`` (``format = "megatron_sd3.cached"``, ``version = 1``): ``num_samples``, ``dtype``,
``buckets`` (pixel ``[H, W]`` per bucket) and ``latent_buckets`` (latent ``[h, w]``), ``latent_channels``,
``text_len``, ``text_dim``, ``pooled_dim``, ``shards`` (each: ``file``, ``num_samples``, ``bucket``, ``bytes``,
``sha256``, ``tensors`` = {name: {``shape``, ``dtype``}}), ``skipped`` (``[{path, reason}]``) and
``num_skipped``, ``encoders`` (paths, classes, VAE shift/scaling factors, T5 length) and ``preprocess``
(settings). The global sample order is the order of ``shards``, samples in file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

FORMAT = "megatron_sd3.cached"
VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "mask")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class ShardError(ValueError):
    """A corrupt, missing or inconsistent shard or manifest; the message is one line naming the file
    and the fix."""


REDO = ("re-run tools/preprocess_data.py with the same arguments into this directory (it redoes the units "
        "whose shards are missing or damaged)")


def _damaged(path, what: str) -> ShardError:
    return ShardError(f"shard {path}: {what}; {REDO}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _sorted_metadata(blob: bytes) -> bytes:
    """The safetensors file ``blob`` with its ``__metadata__`` keys in sorted order: safetensors
    writes them from a hash map, in an order that changes from process to process, and a shard
    must be the same bytes whoever writes it (a rerun after a crash, another rank)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return blob
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    size = max(n, (len(text) + 7) // 8 * 8)  # data stays 8-byte aligned
    return struct.pack("<Q", size) + text + b" " * (size - len(text)) + blob[8 + n:]


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write one shard atomically (the same bytes for the same tensors and metadata); returns its
    manifest entry (without ``bucket``)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, _sorted_metadata(save(tensors, metadata=metadata)))
    n = {v.shape[0] for v in tensors.values()}
    if len(n) != 1:
        raise ShardError(f"shard {path}: tensors disagree on the sample count {sorted(n)}")
    return {
        "file": f"{path.parent.name}/{path.name}",
        "num_samples": n.pop(),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "tensors": {k: {"shape": list(v.shape[1:]), "dtype": dtype_name(v.dtype)} for k, v in tensors.items()},
    }


def read_header(path: str | os.PathLike) -> dict:
    """The safetensors JSON header of ``path`` (raises ``ShardError`` when it is not a readable shard)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise _damaged(path, "truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise _damaged(path, f"corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except ShardError:
        raise
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"unreadable safetensors header ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1]
        if 8 + n + end > size:
            raise _damaged(path, f"truncated (tensor {name!r} ends past the end of the file)")
    return header


def load_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"manifest {path}: missing; check --data-path, or finish the preprocessing "
                         f"(tools/preprocess_data.py writes the manifest last)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"manifest {path}: unreadable ({str(e).splitlines()[0][:200]}); {REDO}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ShardError(f"manifest {path}: not a {FORMAT} v{VERSION} manifest; point --data-path at a "
                         f"directory made by tools/preprocess_data.py")
    return m


def check_shard(root: str | os.PathLike, entry: dict, full: bool = True):
    """Check one shard against its manifest entry: exists, size, header (shapes, dtypes, count), sha256 if ``full``."""
    path = Path(root) / entry["file"]
    if not path.exists():
        raise _damaged(path, "missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise _damaged(path, f"size {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
    header = read_header(path)
    for name, t in entry["tensors"].items():
        info = header.get(name)
        want = [entry["num_samples"]] + list(t["shape"])
        if info is None or list(info["shape"]) != want or info["dtype"] != _ST_DTYPES[dtype_from_name(t["dtype"])]:
            raise _damaged(path, f"tensor {name!r} does not match the manifest (expected {want} {t['dtype']})")
    if full:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise _damaged(path, f"sha256 mismatch (corrupt): {digest} != {entry['sha256']}")


def verify(root: str | os.PathLike, fast: bool = False) -> dict:
    """Check the manifest and every shard (size + header; sha256 too unless ``fast``). Returns the manifest.

    Raises :class:`ShardError` (a ``ValueError``) with a one-line message naming the first bad file.
    """
    m = load_manifest(root)
    total = 0
    for entry in m["shards"]:
        check_shard(root, entry, full=not fast)
        total += entry["num_samples"]
    if total != m["num_samples"]:
        raise ShardError(f"manifest {Path(root) / MANIFEST}: shards hold {total} samples, manifest says "
                         f"{m['num_samples']}; {REDO}")
    return m


def check_fits_model(root: str | os.PathLike, m: dict, *, text_dim: int, pooled_dim: int, latent_channels: int,
                     text_len: int | None = None) -> None:
    """The dataset's widths must be the model's (``text_len``: only when the run needs the declared text
    length, i.e. pipeline parallelism). One line naming the manifest and the fix, else nothing."""
    have = {"text_dim": m.get("text_dim"), "pooled_dim": m.get("pooled_dim"),
            "latent_channels": m.get("latent_channels"), "text_len": m.get("text_len")}
    want = {"text_dim": ("joint_attention_dim", text_dim), "pooled_dim": ("pooled_projection_dim", pooled_dim),
            "latent_channels": ("in_channels", latent_channels), "text_len": ("text_seq_len", text_len)}
    bad = [(k, field, v) for k, (field, v) in want.items() if v is not None and have[k] != v]
    if not bad:
        return
    what = "; ".join(f"{k} {have[k]} vs the model's {field} = {v}" for k, field, v in bad)
    fix = ", ".join(f"{field} = {have[k]}" for k, field, _ in bad)
    why = " (pipeline stages exchange activations of the declared text length)" if any(
        k == "text_len" for k, _, _ in bad) else ""
    raise ShardError(f"data {Path(root) / MANIFEST} does not fit the model: {what}{why}; set [model] {fix} "
                     f"(or preprocess with encoders that match the model)")


def main(argv=None):  # python -m megatron_sd3.data DATASET [--fast]
    import argparse
    import sys

    p = argparse.ArgumentParser(description="verify a cached dataset (sizes, headers and sha256 of every shard)")
    p.add_argument("dataset")
    p.add_argument("--fast", action="store_true", help="check sizes and headers only, skip sha256")
    a = p.parse_args(argv)
    try:
        m = verify(a.dataset, fast=a.fast)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ok: {m['num_samples']} samples in {len(m['shards'])} shards, {m['num_skipped']} skipped inputs")
    return 0



def write_dataset(dataset, root: str | os.PathLike, shard_size: int = 256, dtype: str = "bfloat16",
                  encoders: dict | None = None) -> dict:
    """Write any map-style source (e.g. :class:`~megatron_sd3.data.mock.MockDataset`) as a cached dataset.

    Samples are grouped per bucket (``dataset.bucket_ids`` / ``dataset.buckets`` when present), in index order,
    ``shard_size`` per shard. For tests, benchmarks and training smoke runs without encoders.
    Returns the manifest; note the global order is that of the shards, so sample ``i`` of the result is not
    sample ``i`` of the source when there are several buckets (each shard's metadata lists ``input_indices``).
    """
    import numpy as np

    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    tdtype = dtype_from_name(dtype)
    n = len(dataset)
    ids = np.asarray(getattr(dataset, "bucket_ids", np.zeros(n, dtype=np.int64)), dtype=np.int64)
    first = dataset[0]
    buckets = getattr(dataset, "buckets", None) or [tuple(first["latents"].shape[-2:])]
    entries = []
    for b in range(len(buckets)):
        members = np.flatnonzero(ids == b)
        for s in range(0, len(members), shard_size):
            idx = members[s:s + shard_size].tolist()
            samples = [dataset[i] for i in idx]
            tensors = {k: torch.stack([x[k] for x in samples]).to(tdtype) for k in samples[0] if k in SAMPLE_KEYS}
            e = write_shard(root / "shards" / f"b{b:02d}-{s // shard_size:06d}.safetensors", tensors,
                            {"input_indices": json.dumps(idx)})
            e["bucket"] = b
            entries.append(e)
    m = {
        "format": FORMAT, "version": VERSION, "dtype": dtype, "buckets": None,
        "latent_buckets": [list(b) for b in buckets], "latent_channels": int(first["latents"].shape[0]),
        "text_len": int(first["prompt_embeds"].shape[0]), "text_dim": int(first["prompt_embeds"].shape[1]),
        "pooled_dim": int(first["pooled_prompt_embeds"].shape[0]), "encoders": encoders or {"source": type(dataset).__name__},
        "preprocess": {"shard_size": shard_size}, "shards": entries,
        "num_samples": sum(e["num_samples"] for e in entries), "skipped": [], "num_skipped": 0,
    }
    atomic_write_json(root / MANIFEST, m)
    return m
