"""Sampling from a trained model: SD3's flow-matching Euler sampler with classifier-free guidance.

* ``flow_match_schedule(steps, shift)``: the sigmas and model timesteps of diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``, computed the same way
  (same float64/float32 steps, so the numbers are bit-identical); the model timestep is
  ``1000 * sigma``, the ``1000 t`` convention of training (``flow_matching``).
* Euler step ``x <- x + (sigma_next - sigma) * v`` in fp32, as the scheduler's ``step``.
* guidance: when ``cfg_scale > 1`` (diffusers' ``do_classifier_free_guidance``) every step runs
  the unconditional and the conditional input in one batch and combines
  ``v_u + s (v_c - v_u)``; the unconditional input is what training's text dropout feeds
  (``flow_matching.drop_text``: zeroed text tokens and pooled vector).
* ``seeded_noise(seed, n, shape)``: sample ``i`` starts from ``torch.randn`` of a CPU generator
  seeded with ``seed + i`` (what diffusers' pipeline draws with a list of such generators), so a
  sample does not depend on the batch it is drawn in.
* ``sample(model_chunks, ...)``: runs on this rank's stage(s) under any TP/PP layout; with PP > 1
  each step is one forward-only pass of megatron's pipeline schedule
  (``get_forward_backward_func``, ``collect_non_loss_data``); the last stage broadcasts the
  velocity over the pipeline group so every stage keeps the same latents.
* ``build_inference_model(load, ...)``: the one place that builds the model and loads a
  checkpoint (saved under any layout) for inference, EMA weights optionally.
* ``decode_latents(vae, latents, ...)``: uint8 images, as diffusers' SD3 pipeline decodes.
* ``latent_preview(latents)``: a cheap RGB preview of SD3 latents (the linear map SD3
  previewers use), without the VAE.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_sd3.flow_matching import drop_text

NUM_TRAIN_TIMESTEPS = 1000


# -- schedule ----------------------------------------------------------------------------------
def _shifted(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(steps: int, shift: float = 3.0,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas [steps + 1], timesteps [steps])`` exactly as diffusers'
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps)``:
    ``steps`` points evenly spaced from the shifted ``sigma_max`` to the shifted ``sigma_min`` of
    the training grid, shifted (again) by ``shift``, then a terminal 0; timesteps = 1000 sigma."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    T = num_train_timesteps
    grid = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()).to(torch.float32) / T
    grid = _shifted(grid, shift)
    sigma_max, sigma_min = grid[0].item(), grid[-1].item()
    sig = np.linspace(sigma_max * T, sigma_min * T, steps) / T
    sig = torch.from_numpy(_shifted(sig, shift)).to(torch.float32)
    timesteps = sig * T
    return torch.cat([sig, torch.zeros(1)]), timesteps


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One step of the flow ODE from ``sigma`` to ``sigma_next`` (fp32)."""
    return x.float() + (sigma_next - sigma) * velocity.float()


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def uncond_inputs(prompt_embeds: torch.Tensor, pooled: torch.Tensor):
    """The unconditional text input: exactly what training's text dropout feeds a dropped sample."""
    keep = torch.zeros(prompt_embeds.shape[0], dtype=torch.bool, device=prompt_embeds.device)
    return drop_text(prompt_embeds, pooled, keep)


def seeded_noise(seed: int, n: int, shape: Sequence[int], first_index: int = 0) -> torch.Tensor:
    """``[n, *shape]`` starting noise; sample ``i`` from a CPU generator seeded with ``seed + i``."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(seed) + first_index + i))
                      for i in range(n)]) if n else torch.empty(0, *shape)


# -- the loop ------------------------------------------------------------------------------------
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, prompt_embeds: Optional[torch.Tensor],
                 pooled: Optional[torch.Tensor], *, steps: int, cfg_scale: float, shift: float,
                 callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Integrate from ``noise`` (sigma = 1) to sigma = 0. ``velocity_fn(x, timestep [B], text, pooled)``
    returns the model's velocity; ``text``/``pooled`` may be None where a rank does not feed them
    (later pipeline stages). With guidance the batch is ``[uncond; cond]`` (diffusers' order)."""
    sigmas, timesteps = flow_match_schedule(steps, shift)
    do_cfg = cfg_scale > 1.0
    text, pool = prompt_embeds, pooled
    if do_cfg and text is not None:
        u_text, u_pool = uncond_inputs(text, pool)
        text, pool = torch.cat([u_text, text]), torch.cat([u_pool, pool])
    x = noise.float().clone()
    for i in range(steps):
        x_in = torch.cat([x, x]) if do_cfg else x
        t = timesteps[i].to(x.device).expand(x_in.shape[0])
        v = velocity_fn(x_in, t, text, pool).float()
        if do_cfg:
            v_u, v_c = v.chunk(2)
            v = guided(v_u, v_c, cfg_scale)
        x = euler_step(x, v, sigmas[i].to(x.device), sigmas[i + 1].to(x.device))
        if callback is not None:
            callback(i, x)
    return x


# -- the model as a velocity function, under any TP/PP layout ---------------------------------------
def _velocity_of(output) -> torch.Tensor:
    from megatron_sd3.loss import split_output

    return split_output(output)[0]


def _rows(t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Pad ``t`` to ``n`` rows by repeating its last row (whole microbatches)."""
    if t is None or t.shape[0] == n:
        return t
    return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


class ModelVelocity:
    """This rank's model chunk(s) as a ``VelocityFn``: called on every rank of the model-parallel
    group with the same ``x`` and ``timestep`` (text only needed on the first stage); returns
    the velocity on every rank."""

    def __init__(self, model_chunks, micro_batch_size: Optional[int] = None):
        from megatron.core import parallel_state as ps

        from megatron_sd3.training.build import unwrap

        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if len(self.chunks) != 1:
            raise ValueError("sampling runs one model chunk per rank (no virtual pipeline stages)")
        self.model = self.chunks[0]
        self.inner = unwrap(self.model)
        self.mbs = micro_batch_size
        self.pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        self.dtype = self.inner.config.params_dtype

    def _inputs(self, x, t, text, pooled):
        return dict(hidden_states=x.to(self.dtype), encoder_hidden_states=text.to(x.device, self.dtype),
                    pooled_projections=pooled.to(x.device, self.dtype), timestep=t.float(),
                    latent_hw=tuple(x.shape[-2:]))

    def __call__(self, x, t, text, pooled):
        n = x.shape[0]
        mbs = self.mbs or n
        if self.pp == 1:
            outs = [_velocity_of(self.model(**self._inputs(x[i:i + mbs], t[i:i + mbs], text[i:i + mbs],
                                                          pooled[i:i + mbs])))
                    for i in range(0, n, mbs)]
            return torch.cat(outs).float()
        return self._pipelined(x, t, text, pooled, mbs)

    def _pipelined(self, x, t, text, pooled, mbs):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = x.shape[0]
        num_mb = -(-n // mbs)
        padded = num_mb * mbs
        hw = tuple(x.shape[-2:])
        first = ps.is_pipeline_first_stage(ignore_virtual=True)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        data = None
        if first:
            xs, ts, tx, pl = (_rows(v, padded) for v in (x, t, text, pooled))
            data = iter([self._inputs(xs[i:i + mbs], ts[i:i + mbs], tx[i:i + mbs], pl[i:i + mbs])
                         for i in range(0, padded, mbs)])

        def forward_step(data_iterator, model):
            kwargs = next(data_iterator) if self.inner.pre_process else {"latent_hw": hw}
            out = model(**kwargs)
            # the last stage hands its velocity to the schedule as "non-loss data"
            return out, (lambda output, non_loss_data=True: _velocity_of(output).float())

        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=self.model, num_microbatches=num_mb,
            seq_length=self.inner.layout(hw).seq_len, micro_batch_size=mbs, forward_only=True,
            collect_non_loss_data=True)
        v = torch.cat(list(store))[:n].contiguous() if last else torch.empty(x.shape, dtype=torch.float32,
                                                                              device=x.device)
        dist.broadcast(v, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return v


def sample(model_chunks, prompt_embeds: Optional[torch.Tensor], pooled: Optional[torch.Tensor],
           noise: torch.Tensor, *, steps: int = 28, cfg_scale: float = 7.0, shift: float = 3.0,
           micro_batch_size: Optional[int] = None, callback=None) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` from this rank's model chunk(s) (an ``SD3Model`` or megatron
    wrappers of one). Call it on every rank of the model-parallel group with the same ``noise``
    (``seeded_noise``); ``prompt_embeds [N, T, D]`` / ``pooled [N, P]`` are read on the first
    pipeline stage only. ``micro_batch_size`` splits the (guided: 2N) batch of each step."""
    dev = next(iter(_params(model_chunks))).device
    fn = ModelVelocity(model_chunks, micro_batch_size)
    was_training = [c.training for c in fn.chunks]
    for c in fn.chunks:
        c.eval()
    try:
        return euler_sample(fn, noise.to(dev), None if prompt_embeds is None else prompt_embeds.to(dev),
                            None if pooled is None else pooled.to(dev), steps=steps, cfg_scale=cfg_scale,
                            shift=shift, callback=callback)
    finally:
        for c, w in zip(fn.chunks, was_training):
            c.train(w)


def _params(model_chunks):
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for c in chunks:
        yield from c.parameters()


# -- model + weights for inference --------------------------------------------------------------------
def build_inference_model(load: str, *, ema: bool = False, transformer_impl: str = "local",
                          ckpt_step: Optional[int] = None):
    """Build this rank's stage of the checkpoint's model under the current TP/PP/CP layout
    (``parallel_state`` initialised) and load the checkpoint's weights (or its EMA weights),
    whatever layout saved it: the latest checkpoint under ``load``, or iteration ``ckpt_step``.
    Returns ``(model_chunks, config, common_state)``."""
    from megatron.core import parallel_state as ps

    from megatron_sd3.config import make_config
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.ema import EMA
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.build import build_model

    d = ckpt.resolve_load(load, None, ckpt_step)
    common = ckpt.load_common(d)
    if ema and not common.get("has_ema"):
        raise ckpt.CheckpointError(f"--load {d}: the checkpoint has no EMA weights; drop --ema")
    fields = {k: v for k, v in common["model_config"].items() if v is not None}
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = make_config("tiny", parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                           context_parallel_size=ps.get_context_parallel_world_size(),
                                           **pipeline_config_fields(fields["num_layers"], pp)), **fields)
    chunks = build_model(cfg, transformer_impl=transformer_impl)
    averaged = EMA(chunks, 0.0) if ema else None
    ckpt.load_checkpoint(d, chunks, None, averaged, None, model_config=common["model_config"],
                         load_optim=False, load_rng=False)
    if averaged is not None:
        averaged.copy_to(chunks)
    for c in chunks:
        c.eval().requires_grad_(False)
    return chunks, cfg, common


# -- latents -> images ---------------------------------------------------------------------------------
@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """Model-space latents -> uint8 ``[N, 3, H, W]``, as diffusers' SD3 pipeline decodes:
    ``vae.decode(z / scaling + shift)``, then ``(x / 2 + 0.5)`` clamped, times 255, rounded."""
    p = next(vae.parameters())
    x = vae.decode(latents.to(p.device, p.dtype) / scaling_factor + shift_factor).sample.float().cpu()
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


# -- preview ----------------------------------------------------------------------------------------
# SD3 latent -> RGB: the linear map SD3 previewers apply to (scaled) latents, 16 x 3, plus a bias.
SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """``[N, 16, h, w]`` model-space latents -> ``[N, 3, h, w]`` uint8 RGB (one pixel per latent)."""
    if latents.dim() != 4 or latents.shape[1] != len(SD3_LATENT_RGB_FACTORS):
        raise ValueError(f"latent preview needs [N, 16, h, w] SD3 latents, got {tuple(latents.shape)}")
    w = torch.tensor(SD3_LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    b = torch.tensor(SD3_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("nchw,cr->nrhw", latents.float(), w) + b.view(1, 3, 1, 1)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


__all__ = [
    "flow_match_schedule", "euler_step", "guided", "uncond_inputs", "seeded_noise", "euler_sample",
    "ModelVelocity", "sample", "build_inference_model", "decode_latents", "latent_preview",
    "SD3_LATENT_RGB_FACTORS", "SD3_LATENT_RGB_BIAS",
]
