"""Rectified-flow training inputs, as SD3 trains.

* timesteps ``t`` in (0, 1), the noise level (diffusers' sigmas; its SD3 script takes the drawn
  u as an index into descending timesteps, sigma ~ 1 - u, the same for the symmetric densities):
  logit-normal (``sigmoid(N(mean, std))``, SD3's default), uniform, or ``mode``
  (``1 - u - s (cos^2(pi u / 2) - 1 + u)``, u uniform): the densities of
  ``diffusers.training_utils.compute_density_for_timestep_sampling``; an optional shift
  ``t' = s t / (1 + (s - 1) t)`` (SD3's resolution-dependent shift);
* ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, model timestep ``1000 t``;
* per-sample loss weights (:func:`loss_weighting`, diffusers' ``compute_loss_weighting_for_sd3``):
  diffusers' ``--weighting-scheme`` names both a density and a weight, as its script uses it
  (``SCHEMES``: ``sigma_sqrt`` and ``cosmap`` sample t uniformly and weight the loss by
  ``t^-2`` / ``2 / (pi (1 - 2t + 2t^2))``; ``logit_normal`` and ``mode`` are densities with unit
  weights; ``none`` is uniform, unit weights);
* ``precondition_outputs`` (diffusers' ``--precondition-outputs``): the loss compares the x0 the
  prediction implies, ``x_t - t * pred``, with ``x0`` instead of ``pred`` with ``noise - x0``;
  (``docs/design.md``, "Timestep densities and per-sample weights": why the weights leave the
  data-parallel normalisation exact);
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

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sd3.data._seeding import sample_generator


TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
SCHEMES = {  # diffusers' --weighting-scheme: (timestep density, loss weight), as its SD3 script uses it
    "none": ("uniform", "none"),
    "sigma_sqrt": ("uniform", "sigma_sqrt"),
    "logit_normal": ("logit_normal", "none"),
    "mode": ("mode", "none"),
    "cosmap": ("uniform", "cosmap"),
}
_SCHEME_OF_DENSITY = {"logit_normal": "logit_normal", "uniform": "none", "mode": "mode"}


@dataclass(frozen=True)
class FlowMatchingConfig:
    """``timestep_sampling`` (the density of t) and ``weighting_scheme`` (diffusers' name for a
    density and a loss weight, ``SCHEMES``) describe one choice: give either, or both when they
    agree; the other is filled in. Neither: logit-normal t, unit weights (SD3's default and
    diffusers' ``--weighting-scheme logit_normal``)."""

    timestep_sampling: Optional[str] = None
    weighting_scheme: Optional[str] = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    text_dropout: float = 0.0
    precondition_outputs: bool = False

    def __post_init__(self):
        sampling, scheme = self.timestep_sampling, self.weighting_scheme
        problem = scheme_problem(sampling, scheme)
        if problem:
            raise ValueError(problem)
        if scheme is None:
            scheme = _SCHEME_OF_DENSITY[sampling or "logit_normal"]
        object.__setattr__(self, "weighting_scheme", scheme)
        object.__setattr__(self, "timestep_sampling", SCHEMES[scheme][0])
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError("logit_std and shift must be > 0")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text dropout probability must be in [0, 1), got {self.text_dropout}")

    @property
    def weighted(self) -> bool:
        """Whether the loss has per-sample weights other than 1."""
        return SCHEMES[self.weighting_scheme][1] != "none"


def scheme_problem(sampling: Optional[str], scheme: Optional[str]) -> Optional[str]:
    """Why a ``--timestep-sampling`` / ``--weighting-scheme`` pair is not one choice (None: it is)."""
    if sampling is not None and sampling not in TIMESTEP_SAMPLING:
        return f"timestep sampling '{sampling}' unknown; use one of {', '.join(TIMESTEP_SAMPLING)}"
    if scheme is not None and scheme not in SCHEMES:
        return f"weighting scheme '{scheme}' unknown; use one of {', '.join(SCHEMES)}"
    if scheme is not None and sampling is not None and SCHEMES[scheme][0] != sampling:
        return (f"--weighting-scheme {scheme} samples t {SCHEMES[scheme][0]} (as diffusers' SD3 script) but "
                f"--timestep-sampling is {sampling}; give one of the two (--weighting-scheme sets both the "
                f"timestep density and the loss weight)")
    return None


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of diffusers' ``--weighting-scheme`` at ``sigmas`` (t), as
    ``diffusers.training_utils.compute_loss_weighting_for_sd3``: ``sigma_sqrt`` 1/t^2, ``cosmap``
    2 / (pi (1 - 2t + 2t^2)), every other scheme 1."""
    if scheme not in SCHEMES:
        raise ValueError(f"weighting scheme '{scheme}' unknown; use one of {', '.join(SCHEMES)}")
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas)


def precondition(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The x0 a velocity prediction implies, as diffusers' ``--precondition-outputs``:
    ``pred * (-sigma) + x_t`` (``sigmas`` [B], broadcast over the sample)."""
    s = sigmas.view(-1, *([1] * (pred.dim() - 1))).to(pred.dtype)
    return pred * (-s) + noisy.to(pred.dtype)


def _time(g: torch.Generator, cfg: FlowMatchingConfig, device) -> torch.Tensor:
    """One timestep as a 0-d fp32 tensor on ``device``, drawn from ``g`` (no host read)."""
    if cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn((), generator=g, device=device) * cfg.logit_std + cfg.logit_mean)
    elif cfg.timestep_sampling == "mode":
        u = torch.rand((), generator=g, device=device)
        t = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
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
    target: torch.Tensor      # noise - x0 (x0 with precondition_outputs)
    timestep: torch.Tensor    # 1000 t, [B]
    keep_text: torch.Tensor   # [B] bool, False where the text is dropped
    sigmas: Optional[torch.Tensor] = None       # t, [B] fp32
    loss_weight: Optional[torch.Tensor] = None  # [B] per-sample loss weights; None: all 1
    precondition_outputs: bool = False

    def prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """What the loss compares with ``target``: the model's output, or the x0 it implies."""
        return precondition(pred, self.noisy, self.sigmas) if self.precondition_outputs else pred


def make_flow_inputs(latents: torch.Tensor, positions, seed: int,
                     cfg: FlowMatchingConfig = FlowMatchingConfig()) -> FlowSample:
    """Noise the clean latents ``x0`` of a microbatch; ``positions`` are the samples' global
    positions in the training stream (the keys of their generators).

    Everything is drawn on the latents' device, one generator per sample
    (:func:`device_generator`), and nothing is read back to the host. Each sample's draws and
    the arithmetic on them are per sample (0-d), so a sample's numbers do not depend on how many
    samples share its microbatch (batched CPU kernels round differently from scalar ones)."""
    dev = latents.device
    noises, ts, keep, weights = [], [], [], []
    shape = latents.shape[1:]
    for pos in list(positions):
        g = device_generator(seed, int(pos), dev)
        ts.append(_time(g, cfg, dev))
        if cfg.weighted:
            weights.append(loss_weighting(cfg.weighting_scheme, ts[-1]))
        if cfg.text_dropout > 0:
            keep.append(torch.rand((), generator=g, device=dev) >= cfg.text_dropout)
        noises.append(torch.randn(shape, generator=g, device=dev))
    x0 = latents.float()
    noise = torch.stack(noises)
    t = torch.stack(ts)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - tb) * x0 + tb * noise
    keep_text = torch.stack(keep) if keep else torch.ones(len(ts), dtype=torch.bool, device=dev)
    target = x0 if cfg.precondition_outputs else noise - x0
    return FlowSample(noisy=noisy.to(latents.dtype), target=target.to(latents.dtype),
                      timestep=t * 1000.0, keep_text=keep_text, sigmas=t,
                      loss_weight=torch.stack(weights) if weights else None,
                      precondition_outputs=cfg.precondition_outputs)


def drop_text(prompt_embeds: torch.Tensor, pooled: torch.Tensor, keep_text: torch.Tensor):
    """Zero the text tokens and pooled vector of dropped samples (classifier-free guidance).
    Always multiplies (no host read of ``keep_text``; ``x * 1`` is ``x`` exactly)."""
    k = keep_text.to(prompt_embeds.dtype)
    return prompt_embeds * k.view(-1, 1, 1), pooled * k.view(-1, 1)


def sample_timesteps(n: int, cfg: FlowMatchingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` timesteps in (0, 1) from one generator (for analysis and tests)."""
    g = generator or torch.Generator().manual_seed(0)
    return torch.tensor([draw_time(g, cfg) for _ in range(n)])
