"""Deterministic seeds derived from tuples of integers (no global RNG state anywhere in the data path)."""

from __future__ import annotations

import hashlib
import struct

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes, platforms and Python runs)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, str):
            b = p.encode()
            h.update(b"s" + struct.pack("<q", len(b)) + b)
        else:
            h.update(b"i" + struct.pack("<q", int(p)))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(*parts)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g
