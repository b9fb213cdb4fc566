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

``task="compositional"`` makes it the compositional task of :mod:`megatron_sd3.data.compositional`
(two coloured shapes placed in quadrants, a caption in words through a tokenizer and a frozen T5
encoder, held-out colour x shape pairs); ``scene(i)`` is sample ``i``'s scene.

``classes = K > 0`` makes it a *conditional* task (different prompts mean visibly different images):
sample ``i`` belongs to class ``label(i)`` (a function of ``(seed, i)``); its text is the class's fixed
embedding (``class_prompts()``) and its latents are the class's pattern (``class_patterns(h, w)``:
quadrant ``c % 4`` raised, the others lowered, times a per-class sign per channel) plus noise of std
``CLASS_NOISE``. A model that follows its text turns class ``c``'s prompt into pattern ``c``.
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
        classes: int = 0,
        task: str = "random",
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
        self.classes = int(classes)
        if self.classes < 0:
            raise ValueError(f"MockDataset: classes must be >= 0, got {classes}")
        self._class_cache: dict = {}
        if task not in ("random", "compositional"):
            raise ValueError(f"MockDataset: task must be 'random' or 'compositional', got {task!r}")
        if task == "compositional" and self.classes:
            raise ValueError("MockDataset: the compositional task and classes are two tasks; give one")
        self.compositional = None
        if task == "compositional":
            from megatron_sd3.data.compositional import CompositionalTask

            self.compositional = CompositionalTask(self.in_channels, self.text_len, self.text_dim, self.pooled_dim)
            self.compositional.text  # every caption encoded now, in the process that builds the data
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
        if self.compositional is not None:
            out, _ = self.compositional.sample(g, h, w)
        elif self.classes:
            c = self.label(i)
            if self._class_cache.get("hw") != (h, w):
                self._class_cache = {"hw": (h, w), "prompts": self.class_prompts(),
                                     "patterns": self.class_patterns(h, w)}
            text, pooled = self._class_cache["prompts"]
            out = {"latents": self._class_cache["patterns"][c] + CLASS_NOISE * torch.randn(self.in_channels, h, w,
                                                                                       generator=g),
                   "prompt_embeds": text[c].clone(), "pooled_prompt_embeds": pooled[c].clone()}
        else:
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

    def scene(self, i: int):
        """The compositional task's scene of sample ``i`` (what its caption says)."""
        if self.compositional is None:
            raise ValueError("MockDataset built without task='compositional' has no scenes")
        return self.compositional.draw(generator(self.seed, int(i)))

    # -- the conditional task (classes > 0) -------------------------------------------------------------
    def label(self, i: int) -> int:
        """Class of sample ``i``."""
        if not self.classes:
            raise ValueError("MockDataset built without classes has no labels")
        return int(derive_seed(self.seed, int(i), "class") % self.classes)

    def class_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [K, T, D], pooled [K, P])``: each class's fixed text."""
        g = generator(self.seed, "class-prompts")
        return (torch.randn(self.classes, self.text_len, self.text_dim, generator=g),
                torch.randn(self.classes, self.pooled_dim, generator=g))

    def class_patterns(self, h: int, w: int) -> torch.Tensor:
        """``[K, C, h, w]``: each class's clean latents (what its samples are, up to noise)."""
        g = generator(self.seed, "class-patterns")
        signs = torch.randint(0, 2, (self.classes, self.in_channels), generator=g).float() * 2 - 1
        out = torch.full((self.classes, self.in_channels, h, w), -0.5)
        for c in range(self.classes):
            q = c % 4
            rows = slice(0, h // 2) if q < 2 else slice(h // 2, h)
            cols = slice(0, w // 2) if q % 2 == 0 else slice(w // 2, w)
            out[c, :, rows, cols] = 1.5
        return out * signs[:, :, None, None]

    def prompt_rows(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled, labels)``: each class's prompt ``per_class`` times, class by
        class (the sample grid of the conditional task: one row per class)."""
        text, pooled = self.class_prompts()
        labels = torch.arange(self.classes).repeat_interleave(int(per_class))
        return text[labels].contiguous(), pooled[labels].contiguous(), labels

    def classify(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N]``: the class whose pattern each ``[N, C, h, w]`` latent is nearest (mean
        squared distance): a sample follows its prompt when this is the prompt's class."""
        patterns = self.class_patterns(*latents.shape[-2:])
        d = ((latents[:, None].float().cpu() - patterns[None]) ** 2).flatten(2).mean(-1)
        return d.argmin(1)


CLASS_NOISE = 0.2
