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
  exact also when masks differ across DP ranks; that count is the global batch size, so the
  division happens with the host's number (``build.finalize_grads_over_samples``), not after a
  read of megatron's summed ``num_tokens``;
* the report carries ``(sum, weight)`` per term; ``reduce_report`` sums them over
  microbatches and DP ranks: the logged losses are global per-element means.

The step never waits on the device within an iteration's microbatches (``docs/design.md``,
section "A step that never waits on the host"): inputs are copied with ``non_blocking`` (pinned
by ``data/prefetch.py`` on CUDA), noise and timesteps are drawn on the device, the global loss
weights are built on the host from shapes and host-side masks and copied without a wait, and the
reported losses stay a device tensor (``StepResult.loss_tensor``; ``StepResult.losses`` reads
it, once, when asked: at log intervals). Per iteration the host reads two numbers: whether the
global loss is finite, which decides the NaN/Inf skip before ``optimizer.step()`` (megatron's
optimizer checks ``found_inf`` only with a loss scaler, fp16), and, inside megatron, the grad
norm its gradient clipping reads. Pipelines deeper than two stages also read the
latent size on their middle stages, which have no data of their own.
"""
from __future__ import annotations

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
from megatron_sd3.training.build import device, finalize_grads_over_samples, unwrap


@dataclass
class StepResult:
    """``loss_tensor``: ``[loss, *term means]`` (float64, on the device; every rank has it), in
    the order of ``names``; ``losses`` reads it into floats on first access (one host read)."""

    loss_tensor: Optional[torch.Tensor] = None
    names: tuple[str, ...] = ()
    grad_norm: Optional[float] = None
    skipped: bool = False
    latent_hw: tuple[int, int] = (0, 0)
    _losses: Optional[dict] = field(default=None, repr=False)

    @property
    def losses(self) -> dict[str, float]:
        """Global means, ``loss`` first (a host read of ``loss_tensor``: call it at log steps)."""
        if self._losses is None:
            vals = self.loss_tensor.tolist() if self.loss_tensor is not None else []
            self._losses = dict(zip(self.names, vals))
        return self._losses


class TrainStep:
    """One iteration: ``step(microbatches, consumed_samples)`` -> ``StepResult``."""

    def __init__(self, cfg: SD3Config, ddp_chunks, optimizer, *, global_batch_size: int,
                 micro_batch_size: int, seed: int, flow: FlowMatchingConfig = FlowMatchingConfig(),
                 forward_only: bool = False, cuda_graphs: bool = False):
        self.cfg, self.chunks, self.optimizer = cfg, ddp_chunks, optimizer
        self.cuda_graphs = cuda_graphs  # blocks compiled with mode="reduce-overhead"
        self.gbs, self.mbs, self.seed, self.flow = global_batch_size, micro_batch_size, seed, flow
        self.dp = ps.get_data_parallel_world_size()
        if global_batch_size % (micro_batch_size * self.dp):
            raise ValueError(f"global batch {global_batch_size} not divisible by micro batch x DP "
                             f"= {micro_batch_size} x {self.dp}")
        self.num_microbatches = global_batch_size // (micro_batch_size * self.dp)
        self.forward_only = forward_only
        if not forward_only:  # the loss count is the global batch's sample count, known here
            cfg.finalize_model_grads_func = finalize_grads_over_samples(global_batch_size)
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)

    # -- layout --------------------------------------------------------------------------------
    def layout(self, latent_hw) -> ActivationLayout:
        return unwrap(self.chunks[0]).layout(latent_hw)

    def _broadcast_latent_hw(self, microbatches) -> tuple[int, int]:
        """The first and the last stage read the iteration's latent size from their (host-side)
        microbatches; middle stages (pipelines of more than two stages) get it broadcast from the
        first stage, the one host read of a device tensor this costs them."""
        own = tuple(int(v) for v in microbatches[0]["latents"].shape[-2:]) if microbatches else None
        if ps.get_pipeline_model_parallel_world_size() <= 2:
            return own
        hw = torch.zeros(2, dtype=torch.long, device=device())
        if self.first:
            hw.copy_(_to_device(torch.tensor(own, dtype=torch.long)))
        dist.broadcast(hw, src=ps.get_pipeline_model_parallel_first_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return own if own is not None else tuple(hw.tolist())

    def _positions(self, consumed_samples: int, m: int) -> list[int]:
        start = consumed_samples + ps.get_data_parallel_rank() * (self.gbs // self.dp) + m * self.mbs
        return list(range(start, start + self.mbs))

    def _global_weights(self, microbatches, consumed) -> dict[str, torch.Tensor]:
        """Each enabled loss term's weight over the whole global batch (this DP rank's
        microbatches, all-reduced over DP), as 0-d device tensors: summed on the host from the
        host-side microbatches where the weight is known there (shapes, masks), on the device
        where it depends on a device draw (the text-dropout keep flags), reduced on the device."""
        cfg, dev = self.cfg, device()
        terms = enabled_loss_terms(cfg)
        if self.flow.text_dropout > 0 and cfg.text_recon:
            # which samples keep their text (the text-recon weight counts those): the flags the
            # forward step will draw, from the same per-sample generators on the same device
            microbatches = [dict(mb, keep_text=keep_text_flags(self._positions(consumed, m), self.seed, self.flow,
                                                               dev))
                            for m, mb in enumerate(microbatches)]
        host = [sum(t.batch_weight(cfg, mb) for mb in microbatches) for t in terms]
        t = torch.stack([v.to(torch.float64) if isinstance(v, torch.Tensor)
                         else _to_device(torch.tensor(v, dtype=torch.float64)) for v in host]) if terms else \
            torch.zeros(0, dtype=torch.float64, device=dev)
        if self.dp > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        return {term.name: t[i] for i, term in enumerate(terms)}

    # -- the megatron forward step ---------------------------------------------------------------
    def _loss_func(self, latents, flow, mask, weights, output):
        cfg = self.cfg
        inp = loss_inputs(output, flow.target, mask, cfg, flow.keep_text, flow)
        loss, report = None, {}
        for term in enabled_loss_terms(cfg):
            s, w = term.terms(inp)
            w_term = weights[term.name]  # a device tensor in the step (a float in tests)
            if not isinstance(w_term, torch.Tensor):
                w_term = torch.tensor(w_term, dtype=torch.float64, device=s.device)
            # a term may have no weight in the whole batch (all texts dropped): it then adds 0
            scale = torch.where(w_term > 0, self.gbs / w_term.clamp_min(1e-300), torch.zeros_like(w_term))
            v = term.weight(cfg) * s * scale.to(s.dtype)
            if self.in_loss(term):
                loss = v if loss is None else loss + v
            report[term.name] = torch.stack([s.detach(), w.detach().to(s.dtype)])
        count = torch.full((), latents.shape[0], dtype=torch.int, device=loss.device)  # no host copy
        return loss, count, report

    def in_loss(self, term) -> bool:
        """Whether the enabled ``term`` adds to the loss that is backpropagated (all do here;
        ``grad_share.TermGradStep`` keeps one)."""
        return True

    def inputs(self, mb: dict, positions: list[int], with_text: bool):
        """``(flow sample, text, pooled)`` of one microbatch on this rank's device: training's
        noise, timesteps and CFG text dropout, keyed by the samples' stream ``positions``
        (``text``/``pooled`` only ``with_text``, i.e. on the first stage)."""
        dev = device()
        latents = mb["latents"].to(dev, non_blocking=True).float()
        flow = make_flow_inputs(latents, positions, self.seed, self.flow)
        text = pooled = None
        if with_text:
            text = mb["prompt_embeds"].to(dev, non_blocking=True).float()
            pooled = mb["pooled_prompt_embeds"].to(dev, non_blocking=True).float()
            if self.flow.text_dropout > 0:
                text, pooled = drop_text(text, pooled, flow.keep_text)
        return flow, text, pooled

    def _forward_step(self, state, data_iterator, model):
        latent_hw, consumed, weights = state["latent_hw"], state["consumed"], state["weights"]
        inner = unwrap(model)
        m_idx = state["m"]
        needs_data = inner.pre_process or inner.post_process
        mb = next(data_iterator) if needs_data else None
        if needs_data:
            state["m"] += 1
        kwargs = {"latent_hw": latent_hw}
        flow = None
        if mb is not None:
            flow, text, pooled = self.inputs(mb, self._positions(consumed, m_idx), inner.pre_process)
        if inner.pre_process:
            dt = self.cfg.params_dtype  # timesteps stay fp32 (1000 t is coarse in bf16)
            kwargs.update(hidden_states=flow.noisy.to(dt), encoder_hidden_states=text.to(dt),
                          pooled_projections=pooled.to(dt), timestep=flow.timestep)
        output = model(**kwargs)
        if not inner.post_process:
            return output, None
        mask = mb.get("mask")
        mask = None if mask is None else mask.to(flow.target.device, non_blocking=True)
        return output, partial(self._loss_func, mb["latents"], flow, mask, weights)

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self, microbatches: Optional[list[dict]], consumed_samples: int) -> StepResult:
        """``microbatches``: this DP rank's microbatches of the iteration (first and last stage;
        ``None`` elsewhere)."""
        needs_data = self.first or self.last
        if needs_data and (microbatches is None or len(microbatches) != self.num_microbatches):
            raise ValueError(f"expected {self.num_microbatches} microbatches on this stage")
        if self.cuda_graphs:  # a new iteration: the graphs' outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        latent_hw = self._broadcast_latent_hw(microbatches)
        weights = self._global_weights(microbatches, consumed_samples) if self.last else {}
        layout = self.layout(latent_hw)
        state = {"latent_hw": latent_hw, "consumed": consumed_samples, "weights": weights, "m": 0}
        if not self.forward_only:
            for m in self.chunks:
                m.zero_grad_buffer()
            if self.optimizer is not None:
                self.optimizer.zero_grad()
        data = iter(microbatches) if needs_data else None
        vpp = len(self.chunks) > 1
        # the weights are fixed until the optimizer step: what the backend does once per step
        with unwrap(self.chunks[0]).backend.step_context(self.chunks, self.cfg):
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
        result = StepResult(loss_tensor=losses, names=("loss", *(t.name for t in loss_terms())),
                            latent_hw=latent_hw)
        if self.forward_only or self.optimizer is None:  # no optimizer: the gradients only
            return result
        if not bool(torch.isfinite(losses[0])):  # the iteration's one host read
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

    def report_names(self) -> list[str]:
        """The keys of a microbatch's report: every registered loss term."""
        return [term.name for term in loss_terms()]

    def report_totals(self, reports) -> torch.Tensor:
        """``[names, 2]``: each reported ``(sum, weight)`` (``report_names``) over the global
        batch (float64, on the device), on every rank (summed on the last stage, broadcast)."""
        names = self.report_names()
        tot = torch.zeros(len(names), 2, dtype=torch.float64, device=device())
        if self.last:
            for r in reports:
                for i, name in enumerate(names):
                    if name in r:
                        tot[i] += r[name].double()
            dist.all_reduce(tot, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tot, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return tot

    def reduce_report(self, reports) -> torch.Tensor:
        """``[loss, *every registered term's global mean]`` (float64, on the device), on every
        rank. A disabled term reports 0; an enabled one with no weight NaN (0 if ``may_be_empty``)."""
        terms = loss_terms()
        tot = self.report_totals(reports)
        # no weight: NaN, or 0 for a term that may legitimately be empty (text recon, all dropped)
        empty = torch.tensor([0.0 if term.may_be_empty else float("nan") for term in terms],
                             dtype=tot.dtype).to(tot.device)
        means = torch.where(tot[:, 1] > 0, tot[:, 0] / tot[:, 1].clamp_min(1e-300), empty)
        zero = torch.zeros((), dtype=means.dtype, device=means.device)
        means = torch.stack([means[i] if term.enabled(self.cfg) else zero for i, term in enumerate(terms)])
        total = total_of({term.name: means[i] for i, term in enumerate(terms)}, self.cfg)
        if not isinstance(total, torch.Tensor):  # no term enabled
            total = torch.full((), total, dtype=means.dtype, device=means.device)
        return torch.cat([total.reshape(1), means])


def _to_device(t: torch.Tensor) -> torch.Tensor:
    """A small host tensor on this rank's device, copied from pinned memory without a wait."""
    dev = device()
    if dev.type == "cpu":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def microbatch_stream(iterator: Iterator[dict], num_microbatches: int) -> list[dict]:
    """The next iteration's microbatches from a data iterator."""
    return [next(iterator) for _ in range(num_microbatches)]
