"""Rectified-flow training inputs, as SD3 trains.

* timesteps ``t`` in (0, 1): logit-normal (``sigmoid(N(mean, std))``, SD3's default), or uniform;
  an optional shift ``t' = s t / (1 + (s - 1) t)`` (SD3's resolution-dependent shift);
* ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, model timestep ``1000 t``;
* per-sample text dropout for classifier-free guidance: zeroed text tokens and pooled vector.

Noise, timestep and dropout belong to the *sample*, not the rank (``docs/design.md``, section
"Layout-independent randomness"): each sample draws from its own generator keyed by (seed, sample
position in the training stream; ``data/_seeding.sample_generator``), so the first stage (which
noises the latents) and the last stage (which needs ``noise - x0``) agree, and every parallel
layout sees the same numbers. The generators live on the latents' device
(:func:`device_generator`): the draws need no host read and no copy, and on the CPU they are the
numbers of ``sample_generator`` itself.
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


def _time(g: torch.Generator, cfg: FlowMatchingConfig, device) -> torch.Tensor:
    """One timestep as a 0-d fp32 tensor on ``device``, drawn from ``g`` (no host read)."""
    if cfg.weighting == "logit_normal":
        t = torch.sigmoid(torch.randn((), generator=g, device=device) * cfg.logit_std + cfg.logit_mean)
    else:
        t = torch.rand((), generator=g, device=device)
    if cfg.shift != 1.0:  # in fp64, as Python floats would: the same value on every device path
        t = t.double()
        t = (cfg.shift * t / (1 + (cfg.shift - 1) * t)).float()
    return t


def draw_time(g: torch.Generator, cfg: FlowMatchingConfig) -> float:
    """One timestep in (0, 1) as a Python float (analysis; training keeps it on the device)."""
    return float(_time(g, cfg, g.device))


def device_generator(seed: int, position: int, device) -> torch.Generator:
    """``data/_seeding.sample_generator`` ``(seed, position)`` on ``device``: the same seed, so
    on the CPU the same numbers; seeding a CUDA generator is host-side (no synchronisation)."""
    g = sample_generator(seed, position)
    device = torch.device(device)
    if device.type == "cpu":
        return g
    dg = torch.Generator(device=device)
    dg.manual_seed(g.initial_seed())
    return dg


@dataclass
class FlowSample:
    noisy: torch.Tensor       # x_t, [B, C, H, W]
    target: torch.Tensor      # noise - x0
    timestep: torch.Tensor    # 1000 t, [B]
    keep_text: torch.Tensor   # [B] bool, False where the text is dropped


def make_flow_inputs(latents: torch.Tensor, positions, seed: int,
                     cfg: FlowMatchingConfig = FlowMatchingConfig()) -> FlowSample:
    """Noise the clean latents ``x0`` of a microbatch; ``positions`` are the samples' global
    positions in the training stream (the keys of their generators).

    Everything is drawn on the latents' device, one generator per sample
    (:func:`device_generator`), and nothing is read back to the host. Each sample's draws and
    the arithmetic on them are per sample (0-d), so a sample's numbers do not depend on how many
    samples share its microbatch (batched CPU kernels round differently from scalar ones)."""
    dev = latents.device
    noises, ts, keep = [], [], []
    shape = latents.shape[1:]
    for pos in list(positions):
        g = device_generator(seed, int(pos), dev)
        ts.append(_time(g, cfg, dev))
        if cfg.text_dropout > 0:
            keep.append(torch.rand((), generator=g, device=dev) >= cfg.text_dropout)
        noises.append(torch.randn(shape, generator=g, device=dev))
    x0 = latents.float()
    noise = torch.stack(noises)
    t = torch.stack(ts)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - tb) * x0 + tb * noise
    keep_text = torch.stack(keep) if keep else torch.ones(len(ts), dtype=torch.bool, device=dev)
    return FlowSample(noisy=noisy.to(latents.dtype), target=(noise - x0).to(latents.dtype),
                      timestep=t * 1000.0, keep_text=keep_text)


def drop_text(prompt_embeds: torch.Tensor, pooled: torch.Tensor, keep_text: torch.Tensor):
    """Zero the text tokens and pooled vector of dropped samples (classifier-free guidance).
    Always multiplies (no host read of ``keep_text``; ``x * 1`` is ``x`` exactly)."""
    k = keep_text.to(prompt_embeds.dtype)
    return prompt_embeds * k.view(-1, 1, 1), pooled * k.view(-1, 1)


def sample_timesteps(n: int, cfg: FlowMatchingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` timesteps in (0, 1) from one generator (for analysis and tests)."""
    g = generator or torch.Generator().manual_seed(0)
    return torch.tensor([draw_time(g, cfg) for _ in range(n)])
