"""One training iteration through megatron-core: schedules, DDP, optimizer, exact global losses.

``build_model_and_optimizer`` builds this rank's stage(s) of ``SD3Model`` (``pre_process`` /
``post_process`` from ``parallel_state``), wraps them in megatron ``DistributedDataParallel``
and builds megatron's optimizer, wiring them into the config as Megatron-LM's training loop does.

``TrainStep`` runs one iteration with ``get_forward_backward_func`` (1F1B, or interleaved when
virtual stages are used):

* the first and the last stage read the iteration's microbatches (dicts from the data iterator:
  ``latents``, ``prompt_embeds``, ``pooled_prompt_embeds``, optional ``mask``); the global batch
  is laid out as DP-rank blocks of consecutive samples, each split into microbatches, and sample
  ``j`` of the iteration has stream position ``consumed_samples + j``, which keys its noise,
  timestep and text dropout (``flow_matching``), so both stages and every layout agree;
* the loss function follows megatron's ``(loss, count, report)`` convention with
  ``calculate_per_token_loss``: ``count`` is the number of samples, and ``loss`` is scaled so that
  megatron's division by the global count gives exactly
  ``denoise_sum / W + gamma * text_sum / T`` over the *global* batch, where ``W`` (the mask
  weight, or element count) and ``T`` (text elements) are all-reduced over DP up front, so the
  gradient is exact also when masks differ across DP ranks;
* the report carries ``(sum, weight)`` per component; ``reduce_report`` sums them over
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
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sd3.config import SD3Config
from megatron_sd3.flow_matching import FlowMatchingConfig, drop_text, make_flow_inputs
from megatron_sd3.loss import denoise_terms, expand_mask, split_output, text_recon_terms
from megatron_sd3.models.packing import ActivationLayout
from megatron_sd3.models.sd3_model import SD3Model
from megatron_sd3.training import multi_tensor


def unwrap(model) -> SD3Model:
    """The SD3Model inside DDP / Float16Module wrappers."""
    while not isinstance(model, SD3Model):
        model = model.module
    return model


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: SD3Config, transformer_impl: str = "local") -> list[SD3Model]:
    """This rank's model chunks (one per virtual stage)."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        m = SD3Model(cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                     post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                     vp_stage=stage, transformer_impl=transformer_impl)
        m.to(device())
        chunks.append(m)
    return chunks


def compile_blocks(chunks) -> int:
    """``torch.compile`` every joint block in place (``--torch-compile``).

    ``module.compile()`` keeps parameter names, DDP's hooks and the optimizer as they are; only
    the block's forward (and its backward) runs as compiled code, which fuses the adaLN
    modulation, gating, GELU and torchao's FP8 casts around the GEMMs. Embedders and head stay
    eager (small). Blocks with the same structure share one compiled graph. Returns the count.
    """
    n = 0
    for c in chunks:
        for block in unwrap(c).blocks:
            block.compile()
            n += 1
    return n


def wrap_float16(cfg: SD3Config, chunks: list):
    """bf16: megatron's ``Float16Module`` (outputs back to fp32 on the last stage for the loss).
    ``TrainStep`` hands the first stage its inputs already in the parameter dtype, timesteps in fp32."""
    if not cfg.bf16:
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(cfg, c) for c in chunks]


def wrap_ddp(cfg: SD3Config, chunks: list[SD3Model], use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False,
        bucket_size=None)
    return [DistributedDataParallel(config=cfg, ddp_config=ddp_config, module=m,
                                    disable_bucketing=i > 0) for i, m in enumerate(chunks)]


def use_fused_torch_adam(optimizer, device_types=("cuda",)) -> int:
    """Run megatron's torch-AdamW fallback as torch's fused kernel.

    megatron-core takes Transformer Engine's or apex's ``FusedAdam`` when one is installed and
    otherwise falls back to ``torch.optim.AdamW``, which then runs its ``foreach`` path: about ten
    passes over the fp32 master weights and moments per step. Torch's own ``fused=True`` kernel
    makes it one pass, with the same update rule (what megatron wants from FusedAdam). Applied
    to every plain torch Adam/AdamW inside ``optimizer`` whose parameters all sit on
    ``device_types``; returns how many were switched.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    n = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if type(torch_opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # TE/apex FusedAdam, SGD, ...: left as megatron built it
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        if not params or any(p.device.type not in device_types for p in params):
            continue
        for group in torch_opt.param_groups:
            group["fused"], group["foreach"] = True, False
        torch_opt.defaults.update(fused=True, foreach=False)
        n += 1
    return n


def build_optimizer(cfg: SD3Config, ddp_chunks, opt_config: OptimizerConfig):
    multi_tensor.install()  # torch _foreach kernels where megatron lacks apex/TE's (no-op with them)
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    use_fused_torch_adam(optimizer)
    # How Megatron-LM's training loop wires DDP and the optimizer into the schedules.
    cfg.no_sync_func = [m.no_sync for m in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in ddp_chunks]
        cfg.grad_sync_func = sync if len(sync) > 1 else sync[0]
    return optimizer


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

    def _global_weights(self, microbatches) -> tuple[float, float]:
        """(W, T): denoise weight and text-recon element count of the whole global batch."""
        cfg = self.cfg
        w = 0.0
        for mb in microbatches:
            latents = mb["latents"]
            m = expand_mask(mb.get("mask"), latents)
            w += float(latents.numel()) if m is None else float(m.sum())
        t = torch.tensor([w], dtype=torch.float64, device=device())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        text = float(self.gbs * cfg.text_seq_len * cfg.hidden_size)
        return float(t[0]), text

    # -- the megatron forward step ---------------------------------------------------------------
    def _loss_func(self, latents, target, mask, W, T, output):
        cfg = self.cfg
        pred, final_tokens, target_tokens = split_output(output)
        dsum, dweight = denoise_terms(pred, target.to(pred.device), mask, cfg.pseudo_huber_c)
        loss = dsum * (self.gbs / W)
        report = {"denoise_loss": torch.stack([dsum.detach(), dweight.detach().to(dsum.dtype)])}
        if cfg.text_recon:
            tsum, tcount = text_recon_terms(final_tokens, target_tokens)
            loss = loss + cfg.text_recon_gamma * tsum * (self.gbs / T)
            report["text_recon_loss"] = torch.stack([tsum.detach(), tcount.to(tsum.dtype)])
        count = torch.tensor(latents.shape[0], dtype=torch.int, device=loss.device)
        return loss, count, report

    def _forward_step(self, state, data_iterator, model):
        latent_hw, consumed, W, T = state["latent_hw"], state["consumed"], state["W"], state["T"]
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
        return output, partial(self._loss_func, mb["latents"], flow.target, mask, W, T)

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self, microbatches: Optional[list[dict]], consumed_samples: int) -> StepResult:
        """``microbatches``: this DP rank's microbatches of the iteration (first and last stage;
        ``None`` elsewhere)."""
        needs_data = self.first or self.last
        if needs_data and (microbatches is None or len(microbatches) != self.num_microbatches):
            raise ValueError(f"expected {self.num_microbatches} microbatches on this stage")
        latent_hw = self._broadcast_latent_hw(microbatches)
        W, T = self._global_weights(microbatches) if self.last else (1.0, 1.0)
        layout = self.layout(latent_hw)
        state = {"latent_hw": latent_hw, "consumed": consumed_samples, "W": W, "T": T, "m": 0}
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
        """Per-component global means, on every rank (computed on the last stage, broadcast)."""
        keys = ["denoise_loss", "text_recon_loss"]
        tot = torch.zeros(len(keys), 2, dtype=torch.float64, device=device())
        if self.last:
            for r in reports:
                for i, k in enumerate(keys):
                    if k in r:
                        tot[i] += r[k].double()
            dist.all_reduce(tot, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tot, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        denoise = float(tot[0, 0] / tot[0, 1]) if tot[0, 1] > 0 else float("nan")
        text = float(tot[1, 0] / tot[1, 1]) if tot[1, 1] > 0 else 0.0
        return {"loss": denoise + self.cfg.text_recon_gamma * text, "denoise_loss": denoise,
                "text_recon_loss": text}


def microbatch_stream(iterator: Iterator[dict], num_microbatches: int) -> list[dict]:
    """The next iteration's microbatches from a data iterator."""
    return [next(iterator) for _ in range(num_microbatches)]
