"""Rectified-flow training inputs, as SD3 trains.

* timesteps ``t`` in (0, 1): logit-normal (``sigmoid(N(mean, std))``, SD3's default), or uniform;
  an optional shift ``t' = s t / (1 + (s - 1) t)`` (SD3's resolution-dependent shift);
* ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, model timestep ``1000 t``;
* per-sample text dropout for classifier-free guidance: zeroed text tokens and pooled vector.

Noise, timestep and dropout belong to the *sample*, not the rank (``docs/design.md``, section
"Layout-independent randomness"): each sample draws from its own generator keyed by (seed, sample
position in the training stream; ``data/_seeding.sample_generator``), so the first stage (which
noises the latents) and the last stage (which needs ``noise - x0``) agree, and every parallel
layout sees the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sd3.data._seeding import sample_generator


@dataclass(frozen=True)
class FlowMatchingConfig:
    weighting: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    text_dropout: float = 0.0

    def __post_init__(self):
        if self.weighting not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep sampling '{self.weighting}' unknown; use logit_normal or uniform")
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError("logit_std and shift must be > 0")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text dropout probability must be in [0, 1), got {self.text_dropout}")


def draw_time(g: torch.Generator, cfg: FlowMatchingConfig) -> float:
    if cfg.weighting == "logit_normal":
        t = torch.sigmoid(torch.randn((), generator=g) * cfg.logit_std + cfg.logit_mean)
    else:
        t = torch.rand((), generator=g)
    t = float(t)
    if cfg.shift != 1.0:
        t = cfg.shift * t / (1 + (cfg.shift - 1) * t)
    return t


@dataclass
class FlowSample:
    noisy: torch.Tensor       # x_t, [B, C, H, W]
    target: torch.Tensor      # noise - x0
    timestep: torch.Tensor    # 1000 t, [B]
    keep_text: torch.Tensor   # [B] bool, False where the text is dropped


def make_flow_inputs(latents: torch.Tensor, positions, seed: int,
                     cfg: FlowMatchingConfig = FlowMatchingConfig()) -> FlowSample:
    """Noise the clean latents ``x0`` of a microbatch; ``positions`` are the samples' global
    positions in the training stream (the keys of their generators)."""
    noises, ts, keep = [], [], []
    shape = latents.shape[1:]
    for pos in list(positions):
        g = sample_generator(seed, int(pos))
        ts.append(draw_time(g, cfg))
        keep.append(bool(torch.rand((), generator=g) >= cfg.text_dropout) if cfg.text_dropout > 0 else True)
        noises.append(torch.randn(shape, generator=g))
    x0 = latents.float()
    noise = torch.stack(noises).to(x0.device)
    t = torch.tensor(ts, dtype=torch.float32, device=x0.device)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - tb) * x0 + tb * noise
    return FlowSample(noisy=noisy.to(latents.dtype), target=(noise - x0).to(latents.dtype),
                      timestep=t * 1000.0, keep_text=torch.tensor(keep, device=x0.device))


def drop_text(prompt_embeds: torch.Tensor, pooled: torch.Tensor, keep_text: torch.Tensor):
    """Zero the text tokens and pooled vector of dropped samples (classifier-free guidance)."""
    if bool(keep_text.all()):
        return prompt_embeds, pooled
    k = keep_text.to(prompt_embeds.dtype)
    return prompt_embeds * k.view(-1, 1, 1), pooled * k.view(-1, 1)


def sample_timesteps(n: int, cfg: FlowMatchingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` timesteps in (0, 1) from one generator (for analysis and tests)."""
    g = generator or torch.Generator().manual_seed(0)
    return torch.tensor([draw_time(g, cfg) for _ in range(n)])
