"""Validation loss and sample grids during training, both without touching training's numbers.

Validation (``Evaluator``):

* the validation set is ``--valid-data-path DIR`` or the last ``--valid-samples N`` samples of the
  training source (``ValidationSet``; the training sampler gets ``holdout=N`` and never sees them);
  it is read in whole global batches inside one latent bucket, laid out over DP ranks and
  microbatches exactly like a training batch;
* each sample is evaluated at ``K`` stratified timesteps ``t_i = (i + 0.5) / K``, with the text
  kept, from a noise keyed by ``(seed, "eval-noise", dataset index, i)`` (``data/_seeding``):
  a purpose tag of its own, so it is never a training draw, and keyed by the sample, so every
  evaluation of the same weights gives the same numbers under every TP/PP/DP layout;
* the passes run through megatron's forward-only schedule (``EvalStep``: ``TrainStep`` with
  ``forward_only=True`` and the evaluation noise); the loss terms are the registry's
  (``megatron_sd3.loss``), summed as ``(sum, weight)`` over the whole set and DP ranks;
* reported: ``loss``, every term (``denoise_loss``, ``text_recon_loss``), ``loss_at_t``
  (``{t: denoise loss}``) and ``denoise_loss_weighted``: ``denoise_loss`` and ``loss_at_t`` are
  the plain velocity MSE, comparable across runs of any ``--weighting-scheme`` /
  ``--precondition-outputs``; ``denoise_loss_weighted`` is the same samples scored as training
  scores them (the scheme's per-sample weights at each t, the x0 target), and the record names
  the ``weighting_scheme``; the mean over t is the mean of the per-t losses (every t sees the
  same samples); with EMA on, the same for the EMA weights under ``"ema"``, swapped in and
  back exactly (``EMA.copy_to``, then the saved tensors);
* training is untouched: the model's train/eval flags, the CPU/CUDA RNG states and megatron's
  model-parallel RNG tracker are saved and restored, and the training data iterator is not read.

Samples (``SampleGrid``): a fixed-seed grid of the sample prompts (``sampling.sample``, megatron's
forward-only schedule under PP), decoded with the SD3 VAE when ``--sd3-root`` is given, otherwise
a latent preview (``sampling.latent_preview``, one pixel per latent, enlarged); saved as
``SAVE/samples/iter_NNNNNNN.png`` and sent to TensorBoard/W&B.

CLIP score (``ClipEval``, ``--clip-model DIR``): at each evaluation, the same fixed-seed samples
of the sample prompts, decoded with the SD3 VAE (``--sd3-root``: a 16-channel latent preview is
no image a CLIP model can judge), scored against the prompts' own texts (the ``prompts`` metadata
of the prompt file) with ``clip_score.CLIPScorer`` on rank 0 and sent to every rank:
``"clip_score"`` of the eval record (and of ``"ema"`` with EMA on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sd3.data._seeding import generator
from megatron_sd3.flow_matching import FlowMatchingConfig, FlowSample, loss_weighting
from megatron_sd3.loss import LOSS_TERMS, enabled_loss_terms, loss_inputs, loss_terms, total_of
from megatron_sd3.training.build import device
from megatron_sd3.training.step import TrainStep

EVAL_NOISE_TAG = "eval-noise"
WEIGHTED = "denoise_loss_weighted"
"""The denoise loss as the run's scheme weighs it (``--weighting-scheme``, ``--precondition-outputs``);
``denoise_loss`` is the plain velocity MSE, comparable across runs of any scheme."""


def eval_timesteps(k: int) -> list[float]:
    """Stratified timesteps ``(i + 0.5) / k``: the midpoints of ``k`` equal-mass bins of a uniform t."""
    if k < 1:
        raise ValueError(f"the number of evaluation timesteps must be >= 1, got {k}")
    return [(i + 0.5) / k for i in range(k)]


def eval_flow_inputs(latents: torch.Tensor, sample_index, t: float, t_index: int, seed: int,
                     flow: Optional[FlowMatchingConfig] = None) -> tuple[FlowSample, Optional[FlowSample]]:
    """``x_t = (1 - t) x0 + t noise`` with the fixed noise of each (sample, timestep):
    ``(plain, trained)``: the velocity target with unit weights, and, when ``flow`` weights the
    loss or preconditions the outputs, the same sample as training scores it (None otherwise)."""
    x0 = latents.float()
    noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(seed, EVAL_NOISE_TAG, int(i), int(t_index)))
                         for i in sample_index]).to(x0.device)
    noisy = (1 - t) * x0 + t * noise
    n = x0.shape[0]
    sigmas = torch.full((n,), t, dtype=torch.float32, device=x0.device)
    plain = FlowSample(noisy=noisy.to(latents.dtype), target=(noise - x0).to(latents.dtype),
                       timestep=sigmas * 1000.0, keep_text=torch.ones(n, dtype=torch.bool, device=x0.device),
                       sigmas=sigmas)
    if flow is None or not (flow.weighted or flow.precondition_outputs):
        return plain, None
    trained = dataclasses.replace(
        plain, target=x0.to(latents.dtype) if flow.precondition_outputs else plain.target,
        loss_weight=loss_weighting(flow.weighting_scheme, sigmas) if flow.weighted else None,
        precondition_outputs=flow.precondition_outputs)
    return plain, trained


# -- the validation set --------------------------------------------------------------------------
class ValidationSet:
    """Samples ``[start, stop)`` of ``dataset``, in whole global batches inside one bucket."""

    def __init__(self, dataset, start: int = 0, stop: Optional[int] = None):
        self.dataset = dataset
        self.start, self.stop = int(start), len(dataset) if stop is None else int(stop)
        if not 0 <= self.start < self.stop <= len(dataset):
            raise ValueError(f"validation range [{start}, {stop}) is not inside the dataset of {len(dataset)}")
        ids = getattr(dataset, "bucket_ids", None)
        self.bucket_ids = (np.zeros(len(dataset), dtype=np.int64) if ids is None
                           else np.asarray(ids, dtype=np.int64))

    def __len__(self):
        return self.stop - self.start

    def batches(self, global_batch_size: int) -> list[np.ndarray]:
        """The validation global batches: consecutive samples of each bucket, the remainder dropped."""
        idx = np.arange(self.start, self.stop)
        out = []
        for b in np.unique(self.bucket_ids[idx]):
            members = idx[self.bucket_ids[idx] == b]
            n = (len(members) // global_batch_size) * global_batch_size
            out += list(members[:n].reshape(-1, global_batch_size))
        return out

    def load(self, indices: np.ndarray, keys=None) -> dict[str, torch.Tensor]:
        from megatron_sd3.data.sampler import _read, collate

        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            out = get_batch([int(i) for i in indices], keys)
            out["sample_index"] = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
            return out
        return collate([_read(self.dataset, int(i), keys) for i in indices], [int(i) for i in indices])


# -- the forward-only step ----------------------------------------------------------------------------
class EvalStep(TrainStep):
    """``TrainStep`` in forward-only mode whose inputs are the evaluation noise at one fixed t;
    :meth:`totals` runs it and returns ``{term: (sum, weight)}`` over the global batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, forward_only=True, **kw)
        self.t, self.t_index = 0.5, 0

    def inputs(self, mb: dict, positions: list[int], with_text: bool):
        """The fixed noise of each (sample, t), keyed by the sample's index (not its stream
        position), and the text as it is (no dropout)."""
        dev = device()
        plain, trained = eval_flow_inputs(mb["latents"].to(dev, non_blocking=True), mb["sample_index"].tolist(),
                                          self.t, self.t_index, self.seed, self.flow)
        self._trained = trained
        text = pooled = None
        if with_text:
            text = mb["prompt_embeds"].to(dev, non_blocking=True).float()
            pooled = mb["pooled_prompt_embeds"].to(dev, non_blocking=True).float()
        return plain, text, pooled

    def _forward_step(self, state, data_iterator, model):
        output, loss_func = super()._forward_step(state, data_iterator, model)
        if loss_func is not None:  # the microbatch's weighted sample goes with its loss function
            mask = inspect.signature(self._loss_func).bind_partial(*loss_func.args).arguments["mask"]
            loss_func = partial(self._with_weighted, loss_func, self._trained, mask)
        return output, loss_func

    def _with_weighted(self, loss_func, trained, mask, output):
        """The registry's terms on the plain sample, plus ``WEIGHTED``: the denoise term of the
        sample as training scores it (the plain one's when the scheme changes nothing)."""
        loss, count, report = loss_func(output)
        if trained is None:
            report[WEIGHTED] = report["denoise_loss"]
        else:
            # the registry's denoise term on the sample as training sees it (loss_inputs applies the
            # flow's prediction transform and per-sample weights, as in TrainStep._loss_func)
            s, w = LOSS_TERMS["denoise_loss"].terms(loss_inputs(output, trained.target, mask, self.cfg,
                                                                trained.keep_text, trained))
            report[WEIGHTED] = torch.stack([s.detach(), w.detach().to(s.dtype)])
        return loss, count, report

    def report_names(self) -> list[str]:
        return [*super().report_names(), WEIGHTED]

    def reduce_report(self, reports) -> torch.Tensor:
        return self.report_totals(reports)

    def totals(self, microbatches) -> dict[str, tuple[float, float]]:
        """Each reported ``(sum, weight)`` over the global batch of ``microbatches``, on every rank."""
        tot = self(microbatches, 0).loss_tensor.tolist()
        return {name: (s, w) for name, (s, w) in zip(self.report_names(), tot)}


@contextlib.contextmanager
def preserved_training_state(chunks):
    """Run a side computation (evaluation, sampling) and leave training exactly as it was: the
    modules' train/eval flags, the CPU and CUDA RNG states and megatron's model-parallel RNG
    tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    modes = [m.training for c in chunks for m in c.modules()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker = get_cuda_rng_tracker()
    tracked = tracker.get_states()
    try:
        yield
    finally:
        for m, mode in zip((m for c in chunks for m in c.modules()), modes):
            m.training = mode
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


@contextlib.contextmanager
def ema_weights(ema):
    """The EMA's weights in the model, then the model's own weights back, bit for bit."""
    saved = [{n: p.detach().clone() for n, p in c.named_parameters()} for c in ema.chunks]
    ema.copy_to(ema.chunks)
    try:
        yield
    finally:
        with torch.no_grad():
            for c, s in zip(ema.chunks, saved):
                for n, p in c.named_parameters():
                    p.copy_(s[n])


class Evaluator:
    """``evaluate(iteration, ema)`` -> the ``"type": "eval"`` record (same on every rank)."""

    def __init__(self, cfg, ddp_chunks, valid: ValidationSet, *, global_batch_size: int, micro_batch_size: int,
                 seed: int, timesteps: int = 8, eval_iters: int = 0, flow: Optional[FlowMatchingConfig] = None,
                 grad_norms: bool = False):
        self.cfg, self.chunks, self.valid = cfg, list(ddp_chunks), valid
        self.flow = flow or FlowMatchingConfig()
        self.grad_norms = None
        if grad_norms:  # --log-text-grad-norms (training/grad_share.py)
            from megatron_sd3.training.grad_share import TextGradNorms

            self.grad_norms = TextGradNorms(cfg, ddp_chunks, global_batch_size=global_batch_size,
                                            micro_batch_size=micro_batch_size, seed=seed, flow=self.flow)
        self.step = EvalStep(cfg, ddp_chunks, None, global_batch_size=global_batch_size,
                             micro_batch_size=micro_batch_size, seed=seed, flow=self.flow)
        self.ts = eval_timesteps(timesteps)
        batches = valid.batches(global_batch_size)
        if not batches:
            from megatron_sd3.config import ConfigError

            raise ConfigError(f"the validation set ({len(valid)} samples) holds no whole global batch of "
                             f"{global_batch_size}; give more validation samples or a smaller --global-batch-size")
        self.batches = batches[:eval_iters] if eval_iters else batches
        self.gbs, self.mbs = global_batch_size, micro_batch_size
        self.keys = None if self.step.first else ("latents", "mask")

    @property
    def num_samples(self) -> int:
        return len(self.batches) * self.gbs

    def _microbatches(self, batch: np.ndarray) -> Optional[list[dict]]:
        if not (self.step.first or self.step.last):
            return None
        per_rank = self.gbs // self.step.dp
        r = ps.get_data_parallel_rank()
        local = batch[r * per_rank:(r + 1) * per_rank]
        return [self.valid.load(local[m * self.mbs:(m + 1) * self.mbs], self.keys)
                for m in range(self.step.num_microbatches)]

    @torch.no_grad()
    def losses(self) -> dict:
        """``loss``, every term's mean and ``loss_at_t`` over the validation set, current weights."""
        names = self.step.report_names()
        per_t = [{name: [0.0, 0.0] for name in names} for _ in self.ts]
        for batch in self.batches:  # each batch read once, evaluated at every t
            mbs = self._microbatches(batch)
            for i, t in enumerate(self.ts):
                self.step.t, self.step.t_index = t, i
                for name, (s, w) in self.step.totals(mbs).items():
                    per_t[i][name][0] += s
                    per_t[i][name][1] += w
        sums = {name: [sum(p[name][0] for p in per_t), sum(p[name][1] for p in per_t)] for name in names}
        at_t = {}
        for t, p in zip(self.ts, per_t):
            s, w = p["denoise_loss"]
            at_t[f"{t:g}"] = s / w if w > 0 else float("nan")
        enabled = {t.name for t in enabled_loss_terms(self.cfg)} | {WEIGHTED}
        means = {name: ((s / w if w > 0 else float("nan")) if name in enabled else 0.0)
                 for name, (s, w) in sums.items()}
        return {"loss": total_of(means, self.cfg), **means, "loss_at_t": at_t}

    def evaluate(self, iteration: int, ema=None, clip: Optional["ClipEval"] = None) -> dict:
        with preserved_training_state(self.chunks):
            grads = {} if self.grad_norms is None else self.grad_norms.measure(self._microbatches(self.batches[0]))
            for c in self.chunks:
                c.eval()
            rec = {"type": "eval", "iteration": int(iteration), **self.losses(), **grads,
                   "weighting_scheme": self.flow.weighting_scheme,
                   "valid_samples": self.num_samples, "eval_timesteps": len(self.ts)}
            if clip is not None:
                rec["clip_score"] = clip.score()
            if ema is not None:
                with ema_weights(ema):
                    rec["ema"] = self.losses()
                    if clip is not None:
                        rec["ema"]["clip_score"] = clip.score()
        return rec


def eval_log_line(rec: dict) -> str:
    """Megatron-LM's validation block: a rule, the losses, a rule."""
    def line(r, what):
        names = ("loss", *(t.name for t in loss_terms()), WEIGHTED)
        vals = " | ".join(f"{k} value: {r[k]:.6E}" for k in names if k in r)
        if "clip_score" in r:
            vals += f" | clip_score value: {r['clip_score']:.4f}"
        if "grad_norm_text_denoise" in r:  # --log-text-grad-norms
            vals += " | " + " | ".join(f"{k}: {r[k]:.4E}" for k in
                                       ("grad_norm_text_denoise", "grad_norm_text_recon", "text_recon_grad_ratio")
                                       if k in r)
        return f" validation loss{what} at iteration {rec['iteration']} | {vals} |"

    lines = [line(rec, "")]
    if "ema" in rec:
        lines.append(line(rec["ema"], " (EMA)"))
    rule = "-" * max(len(s) for s in lines)
    return "\n".join([rule, *lines, rule])


# -- samples during training ------------------------------------------------------------------------------
def load_prompt_embeds(path: str) -> tuple[torch.Tensor, torch.Tensor, Optional[list[str]]]:
    """``(prompt_embeds [N, T, D], pooled [N, P], prompts or None)`` of a prompt-embeddings file
    (``tools/preprocess_data.py --prompts``)."""
    import json

    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sample-prompts {path}: file not found; write one with "
                                f"tools/preprocess_data.py --prompts prompts.txt")
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - names
        if missing:
            raise ValueError(f"--sample-prompts {path}: tensor(s) {sorted(missing)} missing (has {sorted(names)})")
        meta = f.metadata() or {}
        text, pooled = f.get_tensor("prompt_embeds").float(), f.get_tensor("pooled_prompt_embeds").float()
    prompts = json.loads(meta["prompts"]) if "prompts" in meta else None
    return text, pooled, prompts


def grid_image(images: torch.Tensor, min_side: int = 64, cols: Optional[int] = None,
               row_labels: Optional[list[str]] = None) -> np.ndarray:
    """``[N, 3, h, w]`` uint8 -> one ``[H, W, 3]`` grid (``cols`` columns, default ceil(sqrt N)),
    tiles enlarged (nearest) to at least ``min_side`` pixels; ``row_labels``: a name written
    left of each row, and a white gap of 2 pixels between tiles."""
    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    H, W = images.shape[-2:]
    gap = 2 if row_labels else 0
    grid = torch.full((3, rows * (H + gap) - gap, cols * (W + gap) - gap), 255 if gap else 0, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (H + gap), c * (W + gap)
        grid[:, y:y + H, x:x + W] = images[i]
    out = grid.permute(1, 2, 0).contiguous().numpy()
    if not row_labels:
        return out
    from PIL import Image, ImageDraw

    margin = 8 + 7 * max(len(s) for s in row_labels)  # PIL's default bitmap font: about 6 px a character
    canvas = Image.new("RGB", (margin + out.shape[1], out.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(out), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels[:rows]):
        draw.text((4, r * (H + gap) + H // 2 - 6), label, fill=(0, 0, 0))
    return np.asarray(canvas)


class SampleGrid:
    """A fixed-seed grid of the sample prompts from the current weights (call on every rank)."""

    def __init__(self, chunks, text: torch.Tensor, pooled: torch.Tensor, latent_hw, in_channels: int, *,
                 steps: int = 20, cfg_scale: float = 4.0, shift: float = 3.0, seed: int = 0,
                 sd3_root: Optional[str] = None, out_dir: Optional[str] = None, cols: Optional[int] = None,
                 row_labels: Optional[list[str]] = None, judge=None, chance: Optional[float] = None,
                 details=None, save_tensors: Optional[dict] = None):
        """``cols``/``row_labels``: the grid's layout (``grid_image``); ``judge``: latents ->
        ``[N]`` bool, whether each sample follows its prompt (a task that can tell, such as the
        conditional mock task), reported by ``following_line`` against ``chance``; ``details``:
        latents -> more numbers for the samples row; ``save_tensors``: the grid's latents are saved
        with these beside the image (``iter_N.safetensors``)."""
        from megatron_sd3.sampling import seeded_noise

        self.cols, self.row_labels, self.judge, self.chance = cols, row_labels, judge, chance
        self.details, self.save_tensors = details, save_tensors
        self.following: Optional[tuple[int, int]] = None
        self.chunks = list(chunks)
        self.text, self.pooled = text, pooled
        self.noise = seeded_noise(seed, text.shape[0], (in_channels, *latent_hw))
        self.steps, self.cfg_scale, self.shift = steps, cfg_scale, shift
        self.sd3_root, self.out_dir = sd3_root, out_dir
        self._vae = None

    def latents(self, cfg_scale: Optional[float] = None) -> torch.Tensor:
        from megatron_sd3.sampling import sample

        with preserved_training_state(self.chunks):
            return sample(self.chunks, self.text, self.pooled, self.noise, steps=self.steps,
                          cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale, shift=self.shift).cpu()

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]``: VAE-decoded with ``--sd3-root``, else the latent preview."""
        from megatron_sd3.sampling import decode_latents, latent_preview

        if not self.sd3_root:
            return latent_preview(latents)
        if self._vae is None:
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(os.path.join(self.sd3_root, "vae"),
                                                      local_files_only=True).eval().requires_grad_(False)
        cfg = self._vae.config
        return decode_latents(self._vae, latents, float(cfg.get("scaling_factor", 1.0)),
                              float(cfg.get("shift_factor", 0.0) or 0.0))

    def write(self, iteration: int, metrics=None) -> Optional[str]:
        """Sample (every rank), then on rank 0 save ``iter_NNNNNNN.png`` and send it to ``metrics``.
        With a ``judge``, the same noise is also sampled without guidance (every rank) and both
        shares of samples that follow their prompt go to ``metrics`` as a ``"type": "samples"`` row."""
        lat = self.latents()
        plain = self.latents(cfg_scale=1.0) if self.judge is not None and self.cfg_scale > 1 else None
        if dist.get_rank() != 0:
            return None
        from PIL import Image

        grid = grid_image(self.images(lat), cols=self.cols, row_labels=self.row_labels)
        if self.judge is not None:
            ok = self.judge(lat)
            self.following = (int(ok.sum()), int(ok.numel()))
            row = {"type": "samples", "iteration": int(iteration), "prompt_following": float(ok.float().mean())}
            if self.details is not None:
                row.update(self.details(lat))
            if plain is not None:
                row["prompt_following_no_guidance"] = float(self.judge(plain).float().mean())
            if metrics is not None:
                metrics.write(row)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"iter_{iteration:07d}.png")
        Image.fromarray(grid).save(path)
        if self.save_tensors is not None:
            from safetensors.torch import save_file

            save_file({"latents": lat.contiguous(), **self.save_tensors}, path[:-len(".png")] + ".safetensors")
        if metrics is not None:
            metrics.image("samples", grid, iteration)
        return path


    def following_line(self) -> Optional[str]:
        """``samples following their prompt: 0.97 (31 of 32; chance 0.25)`` after a judged
        ``write`` (rank 0), else None."""
        if self.following is None:
            return None
        hits, n = self.following
        chance = "" if self.chance is None else f"; chance {self.chance:.2g}"
        return f"samples following their prompt: {hits / n:.2f} ({hits} of {n}{chance})"


class ClipEval:
    """The CLIP score of a ``SampleGrid``'s samples (VAE-decoded) against their prompt texts;
    ``score()`` is called on every rank and returns the same number everywhere."""

    def __init__(self, grid: SampleGrid, prompts: list[str], model_dir: str):
        if not grid.sd3_root:
            raise ValueError("the CLIP score needs VAE-decoded samples: give --sd3-root")
        if len(prompts) != grid.text.shape[0]:
            raise ValueError(f"{len(prompts)} prompt texts for {grid.text.shape[0]} prompt embeddings")
        self.grid, self.prompts, self.model_dir = grid, list(prompts), model_dir
        self.scorer = None
        if dist.get_rank() == 0:
            from megatron_sd3.clip_score import CLIPScorer

            self.scorer = CLIPScorer(model_dir)

    def score(self) -> float:
        lat = self.grid.latents()
        v = torch.zeros(1, dtype=torch.float64, device=device())
        if dist.get_rank() == 0:
            v[0] = self.scorer.score(list(self.grid.images(lat)), self.prompts)
        dist.broadcast(v, src=0)
        return float(v[0])


__all__ = ["ClipEval", "eval_timesteps", "eval_flow_inputs", "ValidationSet", "EvalStep", "Evaluator", "eval_log_line",
           "preserved_training_state", "ema_weights", "load_prompt_embeds", "grid_image", "SampleGrid",
           "EVAL_NOISE_TAG"]
