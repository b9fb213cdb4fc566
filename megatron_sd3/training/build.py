"""The one build path of training: config -> model chunks -> ``Float16Module`` -> megatron DDP ->
megatron optimizer -> ``OptimizerParamScheduler`` -> EMA.

``build_training`` is what ``pretrain.py``, ``tools/bench_throughput.py`` and the training tests
call; nothing else wires these pieces. It builds this rank's stage(s) of ``SD3Model``
(``pre_process`` / ``post_process`` from ``parallel_state``, one chunk per virtual stage), wraps
them in megatron's ``Float16Module`` with ``--bf16`` and in megatron ``DistributedDataParallel``,
builds megatron's optimizer and wires DDP and the optimizer into the config as Megatron-LM's
training loop does (``no_sync_func``, ``finalize_model_grads_func``, ``grad_scale_func``,
``grad_sync_func``). The LR scheduler and the EMA are optional (benchmarks and tests leave them
out). ``Built.free`` breaks the config <-> optimizer/DDP reference cycle those hooks create.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sd3.config import SD3Config
from megatron_sd3.models.sd3_model import SD3Model
from megatron_sd3.training import multi_tensor
from megatron_sd3.training.ema import EMA

_CONFIG_HOOKS = ("no_sync_func", "grad_sync_func", "finalize_model_grads_func", "grad_scale_func")


def device() -> torch.device:
    """This rank's device: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def unwrap(model) -> SD3Model:
    """The SD3Model inside DDP / Float16Module wrappers."""
    while not isinstance(model, SD3Model):
        model = model.module
    return model


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
class Built:
    """What ``build_training`` made. ``chunks``: the model chunks as the schedules see them
    (``Float16Module``-wrapped with bf16), ``ddp``: the same in DDP, ``models``: the bare
    ``SD3Model`` of each chunk (what checkpoints and the EMA hold)."""

    cfg: SD3Config
    chunks: list
    ddp: list
    optimizer: Any
    scheduler: Optional[OptimizerParamScheduler] = None
    ema: Optional[EMA] = None
    compiled_blocks: int = 0
    models: list = field(default_factory=list)

    def free(self) -> None:
        """Release model, optimizer and config now (not at some later garbage collection): the
        config holds the optimizer and DDP through megatron's hooks (``grad_scale_func``,
        ``no_sync_func``, ...), and the model holds the config, a cycle refcounting cannot free."""
        for hook in _CONFIG_HOOKS:
            setattr(self.cfg, hook, None)
        self.cfg = self.chunks = self.ddp = self.optimizer = self.scheduler = self.ema = None
        self.models = []
        gc.collect()
        if self.compiled_blocks:
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_training(cfg: SD3Config, *, transformer_impl: str = "local", optimizer: Optional[dict] = None,
                   use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                   torch_compile: bool = False, scheduler: Optional[dict] = None,
                   ema_decay: float = 0.0, ema_update_interval: int = 1, ema_warmup: str = "none",
                   ema_inv_gamma: float = 1.0, ema_power: float = 2 / 3) -> Built:
    """Model chunks, DDP, optimizer (and optionally compiled blocks, LR scheduler, EMA).

    ``optimizer``: ``OptimizerConfig`` fields (``lr``, ``weight_decay``, ``clip_grad``, ...);
    ``optimizer`` defaults to "adam", and ``bf16``, ``params_dtype`` and
    ``use_distributed_optimizer`` come from ``cfg`` and the arguments here, so that optimizer,
    model and DDP cannot disagree. ``scheduler``: ``OptimizerParamScheduler`` keyword arguments
    (None: no scheduler). ``ema_decay`` > 0 keeps an EMA of the optimizer's fp32 master weights
    (``training/ema.py``; ``ema_warmup`` / ``ema_inv_gamma`` / ``ema_power``: diffusers' EMAModel warmup).
    """
    opt_fields = {"optimizer": "adam", **(optimizer or {})}
    for k in ("bf16", "params_dtype", "use_distributed_optimizer"):
        if k in opt_fields:
            raise ValueError(f"build_training: optimizer field {k!r} is set from the model config / "
                             f"the use_distributed_optimizer argument; leave it out")
    opt_config = OptimizerConfig(bf16=cfg.bf16, params_dtype=cfg.params_dtype,
                                 use_distributed_optimizer=use_distributed_optimizer, **opt_fields)
    chunks = wrap_float16(cfg, build_model(cfg, transformer_impl=transformer_impl))
    ddp = wrap_ddp(cfg, chunks, use_distributed_optimizer=use_distributed_optimizer,
                   overlap_grad_reduce=overlap_grad_reduce)
    opt = build_optimizer(cfg, ddp, opt_config)
    compiled = compile_blocks(chunks) if torch_compile else 0
    sched = OptimizerParamScheduler(opt, **scheduler) if scheduler is not None else None
    models = [unwrap(m) for m in ddp]
    ema = EMA(models, ema_decay, ema_update_interval, optimizer=opt, warmup=ema_warmup, inv_gamma=ema_inv_gamma,
              power=ema_power) if ema_decay > 0 else None
    return Built(cfg=cfg, chunks=chunks, ddp=ddp, optimizer=opt, scheduler=sched, ema=ema,
                 compiled_blocks=compiled, models=models)
