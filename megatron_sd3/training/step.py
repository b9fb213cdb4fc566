"""One training iteration through megatron-core: schedules, DDP, optimizer, exact global losses.

The model chunks, DDP and the optimizer come from ``training/build.py`` (``build_training``).
``TrainStep`` runs one iteration with ``get_forward_backward_func`` (1F1B, or interleaved when
virtual stages are used):

* the first and the last stage read the iteration's microbatches (dicts from the data iterator:
  ``latents``, ``prompt_embeds``, ``pooled_prompt_embeds``, optional ``mask``); the global batch
  is laid out as DP-rank blocks of consecutive samples, each split into microbatches, and sample
  ``j`` of the iteration has stream position ``consumed_samples + j``, which keys its noise,
  timestep and text dropout (``flow_matching``), so both stages and every layout agree;
* the loss is the registry's (``megatron_sd3.loss``: ``denoise_loss`` and ``text_recon_loss``
  by default); each enabled term ``k`` gives ``(sum_k, weight_k)`` per microbatch, and its
  weight ``W_k`` over the *global* batch (the mask weight or element count for the denoise
  term, the text element count for text reconstruction) is all-reduced over DP up front;
* the loss function follows megatron's ``(loss, count, report)`` convention with
  ``calculate_per_token_loss``: ``count`` is the number of samples, and ``loss`` is scaled so that
  megatron's division by the global count gives exactly ``sum_k weight_k * sum_k / W_k`` over
  the global batch (``denoise_sum / W + gamma * text_sum / T`` by default), so the gradient is
  exact also when masks differ across DP ranks;
* the report carries ``(sum, weight)`` per term; ``reduce_report`` sums them over
  microbatches and DP ranks: the logged losses are global per-element means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sd3.config import SD3Config
from megatron_sd3.flow_matching import FlowMatchingConfig, drop_text, make_flow_inputs
from megatron_sd3.loss import enabled_loss_terms, keep_text_flags, loss_inputs, loss_terms, total_of
from megatron_sd3.models.packing import ActivationLayout
from megatron_sd3.training.build import device, unwrap


@dataclass
class StepResult:
    losses: dict[str, float] = field(default_factory=dict)  # global means (all ranks get them)
    grad_norm: Optional[float] = None
    skipped: bool = False
    latent_hw: tuple[int, int] = (0, 0)


class TrainStep:
    """One iteration: ``step(microbatches, consumed_samples)`` -> ``StepResult``."""

    def __init__(self, cfg: SD3Config, ddp_chunks, optimizer, *, global_batch_size: int,
                 micro_batch_size: int, seed: int, flow: FlowMatchingConfig = FlowMatchingConfig(),
                 forward_only: bool = False):
        self.cfg, self.chunks, self.optimizer = cfg, ddp_chunks, optimizer
        self.gbs, self.mbs, self.seed, self.flow = global_batch_size, micro_batch_size, seed, flow
        self.dp = ps.get_data_parallel_world_size()
        if global_batch_size % (micro_batch_size * self.dp):
            raise ValueError(f"global batch {global_batch_size} not divisible by micro batch x DP "
                             f"= {micro_batch_size} x {self.dp}")
        self.num_microbatches = global_batch_size // (micro_batch_size * self.dp)
        self.forward_only = forward_only
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)

    # -- layout --------------------------------------------------------------------------------
    def layout(self, latent_hw) -> ActivationLayout:
        return unwrap(self.chunks[0]).layout(latent_hw)

    def _broadcast_latent_hw(self, microbatches) -> tuple[int, int]:
        """The first stage knows the iteration's latent size; every stage needs the p2p shape."""
        hw = torch.zeros(2, dtype=torch.long, device=device())
        if self.first:
            hw[:] = torch.tensor(microbatches[0]["latents"].shape[-2:])
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(hw, src=ps.get_pipeline_model_parallel_first_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return int(hw[0]), int(hw[1])

    def _positions(self, consumed_samples: int, m: int) -> list[int]:
        start = consumed_samples + ps.get_data_parallel_rank() * (self.gbs // self.dp) + m * self.mbs
        return list(range(start, start + self.mbs))

    def _global_weights(self, microbatches, consumed) -> dict[str, float]:
        """Each enabled loss term's weight over the whole global batch (this DP rank's
        microbatches, all-reduced over DP)."""
        terms = enabled_loss_terms(self.cfg)
        if self.flow.text_dropout > 0:  # which samples keep their text (the text-recon weight counts those)
            microbatches = [dict(mb, keep_text=keep_text_flags(self._positions(consumed, m), self.seed, self.flow))
                            for m, mb in enumerate(microbatches)]
        w = [sum(t.batch_weight(self.cfg, mb) for mb in microbatches) for t in terms]
        t = torch.tensor(w, dtype=torch.float64, device=device())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return {term.name: float(v) for term, v in zip(terms, t)}

    # -- the megatron forward step ---------------------------------------------------------------
    def _loss_func(self, latents, target, mask, weights, keep_text, output):
        cfg = self.cfg
        inp = loss_inputs(output, target, mask, cfg, keep_text)
        loss, report = None, {}
        for term in enabled_loss_terms(cfg):
            s, w = term.terms(inp)
            v = term.weight(cfg) * s * (self.gbs / weights[term.name] if weights[term.name] > 0 else 0.0)
            loss = v if loss is None else loss + v
            report[term.name] = torch.stack([s.detach(), w.detach().to(s.dtype)])
        count = torch.tensor(latents.shape[0], dtype=torch.int, device=loss.device)
        return loss, count, report

    def _forward_step(self, state, data_iterator, model):
        latent_hw, consumed, weights = state["latent_hw"], state["consumed"], state["weights"]
        dev = device()
        inner = unwrap(model)
        m_idx = state["m"]
        needs_data = inner.pre_process or inner.post_process
        mb = next(data_iterator) if needs_data else None
        if needs_data:
            state["m"] += 1
        kwargs = {"latent_hw": latent_hw}
        flow = None
        if mb is not None:
            latents = mb["latents"].to(dev).float()
            flow = make_flow_inputs(latents, self._positions(consumed, m_idx), self.seed, self.flow)
        if inner.pre_process:
            text, pooled = drop_text(mb["prompt_embeds"].to(dev).float(),
                                     mb["pooled_prompt_embeds"].to(dev).float(), flow.keep_text)
            dt = self.cfg.params_dtype  # timesteps stay fp32 (1000 t is coarse in bf16)
            kwargs.update(hidden_states=flow.noisy.to(dt), encoder_hidden_states=text.to(dt),
                          pooled_projections=pooled.to(dt), timestep=flow.timestep)
        output = model(**kwargs)
        if not inner.post_process:
            return output, None
        mask = mb.get("mask")
        mask = None if mask is None else mask.to(flow.target.device)
        return output, partial(self._loss_func, mb["latents"], flow.target, mask, weights, flow.keep_text)

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self, microbatches: Optional[list[dict]], consumed_samples: int) -> StepResult:
        """``microbatches``: this DP rank's microbatches of the iteration (first and last stage;
        ``None`` elsewhere)."""
        needs_data = self.first or self.last
        if needs_data and (microbatches is None or len(microbatches) != self.num_microbatches):
            raise ValueError(f"expected {self.num_microbatches} microbatches on this stage")
        latent_hw = self._broadcast_latent_hw(microbatches)
        weights = self._global_weights(microbatches, consumed_samples) if self.last else {}
        layout = self.layout(latent_hw)
        state = {"latent_hw": latent_hw, "consumed": consumed_samples, "weights": weights, "m": 0}
        if not self.forward_only:
            for m in self.chunks:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
        data = iter(microbatches) if needs_data else None
        vpp = len(self.chunks) > 1
        reports = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, state),
            data_iterator=[data] * len(self.chunks) if vpp else data,
            model=self.chunks if vpp else self.chunks[0],
            num_microbatches=self.num_microbatches,
            seq_length=layout.seq_len,
            micro_batch_size=self.mbs,
            forward_only=self.forward_only,
        )
        losses = self.reduce_report(reports)
        result = StepResult(losses=losses, latent_hw=latent_hw)
        if self.forward_only:
            return result
        if not math.isfinite(losses["loss"]):
            # A NaN/Inf loss: no update (the caller counts it and stops after too many).
            result.skipped = True
            for m in self.chunks:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            return result
        ok, grad_norm, _ = self.optimizer.step()
        result.skipped = not ok
        result.grad_norm = None if grad_norm is None else float(grad_norm)
        return result

    def reduce_report(self, reports) -> dict[str, float]:
        """``loss`` and every registered term's global mean, on every rank (computed on the last
        stage, broadcast). A disabled term reports 0; an enabled one with no weight NaN."""
        terms = loss_terms()
        tot = torch.zeros(len(terms), 2, dtype=torch.float64, device=device())
        if self.last:
            for r in reports:
                for i, term in enumerate(terms):
                    if term.name in r:
                        tot[i] += r[term.name].double()
            dist.all_reduce(tot, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tot, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        means = {}
        for i, term in enumerate(terms):
            if not term.enabled(self.cfg) or (term.may_be_empty and tot[i, 1] == 0):
                means[term.name] = 0.0
            else:
                means[term.name] = float(tot[i, 0] / tot[i, 1]) if tot[i, 1] > 0 else float("nan")
        return {"loss": total_of(means, self.cfg), **means}


def microbatch_stream(iterator: Iterator[dict], num_microbatches: int) -> list[dict]:
    """The next iteration's microbatches from a data iterator."""
    return [next(iterator) for _ in range(num_microbatches)]
