"""Deterministic synthetic source with the same sample contract as the cached real data.

``MockDataset(num_samples, latent_size, in_channels, text_len, text_dim, pooled_dim, with_mask, seed)``
returns, for sample ``i``, a dict of fp32 tensors

- ``latents`` ``[in_channels, H, W]``
- ``prompt_embeds`` ``[text_len, text_dim]``
- ``pooled_prompt_embeds`` ``[pooled_dim]``
- ``mask`` ``[H, W]`` (only when ``with_mask``; values in {0, 1}, never all zero)

Sample ``i`` depends only on ``(seed, i)``: it is drawn from a ``torch.Generator`` seeded from a hash of
``(seed, i)``, so any process, any data-parallel layout and any resume point sees the same numbers.

``latent_size`` is one ``(H, W)`` or a list of them (aspect buckets); with buckets, sample ``i`` belongs to
bucket ``bucket_ids[i]`` (also a function of ``(seed, i)`` only) and has that bucket's shape. The
``buckets`` / ``bucket_ids`` attributes are what :mod:`megatron_sd3.data.sampler` uses to keep every
global batch inside one bucket; :class:`megatron_sd3.data.dataset.ShardedDataset` exposes the same.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_sd3.data._seeding import derive_seed, generator


class MockDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        num_samples: int,
        latent_size: tuple[int, int] | Sequence[tuple[int, int]] = (32, 32),
        in_channels: int = 16,
        text_len: int = 333,
        text_dim: int = 4096,
        pooled_dim: int = 2048,
        with_mask: bool = False,
        seed: int = 1234,
    ):
        if num_samples <= 0:
            raise ValueError(f"MockDataset: num_samples must be > 0, got {num_samples}")
        if len(latent_size) == 2 and all(isinstance(v, int) for v in latent_size):
            buckets = [tuple(int(v) for v in latent_size)]
        else:
            buckets = [tuple(int(v) for v in b) for b in latent_size]
        if not buckets:
            raise ValueError("MockDataset: latent_size must be (H, W) or a non-empty list of (H, W)")
        self.num_samples = int(num_samples)
        self.buckets: list[tuple[int, int]] = buckets  # latent (H, W) of each bucket
        self.in_channels = int(in_channels)
        self.text_len = int(text_len)
        self.text_dim = int(text_dim)
        self.pooled_dim = int(pooled_dim)
        self.with_mask = bool(with_mask)
        self.seed = int(seed)
        nb = len(buckets)
        self.bucket_ids = np.array(
            [derive_seed(self.seed, i, "bucket") % nb if nb > 1 else 0 for i in range(self.num_samples)],
            dtype=np.int64,
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"MockDataset index {i} out of range [0, {self.num_samples})")
        g = generator(self.seed, i)
        h, w = self.buckets[int(self.bucket_ids[i])]
        out = {
            "latents": torch.randn(self.in_channels, h, w, generator=g),
            "prompt_embeds": torch.randn(self.text_len, self.text_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(self.pooled_dim, generator=g),
        }
        if self.with_mask:
            m = (torch.rand(h, w, generator=g) > 0.3).float()
            m.view(-1)[0] = 1.0
            out["mask"] = m
        return out
