"""Keyed randomness: every draw outside megatron's RNG tracker comes from a generator seeded from a
key, never from a running global state, so no result depends on the parallel layout, the rank or
the order in which ranks draw (``docs/design.md``, section "Layout-independent randomness").

The keys, and the one place each seed is derived:

* data (mock samples, sampler shuffling, preprocessing): :func:`derive_seed` ``(*parts)``, a
  blake2b hash of the tuple (stable across processes, platforms and Python runs); :func:`generator`;
* model initialisation, one stream per module group: :func:`init_rng` ``(init_seed, stream)``
  with stream 0 = embeddings, ``n`` = joint block ``n`` (global, 1-based), ``num_layers + 1`` =
  output head;
* flow matching (noise, timestep, text dropout), one stream per sample:
  :func:`sample_generator` ``(seed, position in the training stream)``.

The last two predate :func:`derive_seed` and keep their own arithmetic so that initial weights
and noise stay what they were (checkpoints and recorded runs reproduce).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def init_rng(seed: int, stream: int):
    """Fork the global CPU RNG, seeded from (seed, stream), for one module group's initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + stream) % (2**63))
        yield


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of one training sample (its noise, timestep and text dropout)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 6_364_136_223_846_793_005 + int(position) * 1_442_695_040_888_963_407 + 1)
                  % (2**63))
    return g
