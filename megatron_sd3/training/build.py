"""The one build path of training: config -> model chunks -> ``Float16Module`` -> megatron DDP ->
megatron optimizer -> ``OptimizerParamScheduler`` -> EMA.

``build_training`` is what ``pretrain.py``, ``tools/bench_throughput.py`` and the training tests
call; nothing else wires these pieces. It builds this rank's stage(s) of ``SD3Model``
(``pre_process`` / ``post_process`` from ``parallel_state``, one chunk per virtual stage), wraps
them in megatron's ``Float16Module`` with ``--bf16`` and in megatron ``DistributedDataParallel``,
builds megatron's optimizer and wires DDP and the optimizer into the config as Megatron-LM's
training loop does (``no_sync_func``, ``finalize_model_grads_func``, ``grad_scale_func``,
``grad_sync_func``, ``param_sync_func``). With ``overlap_param_gather`` (distributed optimizer)
the optimizer step leaves the updated parameters in the optimizer's shards and megatron's DDP
forward pre-hooks all-gather them, bucket by bucket, as the next forward pass reaches them;
whatever reads the weights outside a forward pass (checkpoint save, EMA update) runs inside
:func:`params_synced`. The LR scheduler and the EMA are optional (benchmarks and tests leave them
out). ``Built.free`` breaks the config <-> optimizer/DDP reference cycle those hooks create.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
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

_CONFIG_HOOKS = ("no_sync_func", "grad_sync_func", "param_sync_func", "finalize_model_grads_func",
                 "grad_scale_func")


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


# torch.compile modes of ``--torch-compile-mode``; "reduce-overhead" replays each joint block's
# forward and backward as CUDA graphs (torch's CUDA-graph trees).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str, *, torch_compile: bool, transformer_impl: str = "local",
                       cuda: bool | None = None) -> None:
    """Refuse, in one line, what torch.compile's CUDA-graph mode cannot capture.

    megatron-core's own CUDA graphs (``--cuda-graph-impl local|transformer_engine``) capture
    ``GraphableMegatronModule`` layers (``TransformerLayer``, ``MambaLayer``) with a single
    hidden-state output; the joint block is a plain ``MegatronModule`` with two streams (image
    and text tokens), so the blocks are captured by torch.compile's "reduce-overhead" mode.
    """
    from megatron_sd3.config import ConfigError

    if mode not in COMPILE_MODES:
        raise ConfigError(f"--torch-compile-mode {mode!r} unknown; use one of {', '.join(COMPILE_MODES)}")
    if mode == "default":
        return
    if not torch_compile:
        raise ConfigError(f"--torch-compile-mode {mode} is a mode of torch.compile; add --torch-compile")
    if mode != "reduce-overhead":
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        raise ConfigError("--torch-compile-mode reduce-overhead captures CUDA graphs and needs a CUDA GPU; "
                          "use the default mode on CPU")
    if transformer_impl == "transformer_engine":
        raise ConfigError("--torch-compile-mode reduce-overhead cannot capture Transformer Engine layers "
                          "(torch.compile does not trace them); use --transformer-impl local")


def compile_blocks(chunks, mode: str = "default") -> int:
    """``torch.compile`` every joint block in place (``--torch-compile``; ``mode``:
    ``--torch-compile-mode``, see ``COMPILE_MODES``).

    ``module.compile()`` keeps parameter names, DDP's hooks and the optimizer as they are; only
    the block's forward (and its backward) runs as compiled code, which fuses the adaLN
    modulation, gating, GELU and torchao's FP8 casts around the GEMMs. Embedders and head stay
    eager (small). Blocks with the same structure share one compiled graph. Returns the count.
    """
    n = 0
    kwargs = {} if mode == "default" else {"mode": mode}
    for c in chunks:
        for block in unwrap(c).blocks:
            block.compile(**kwargs)
            n += 1
    return n


def wrap_float16(cfg: SD3Config, chunks: list):
    """bf16: megatron's ``Float16Module`` (outputs back to fp32 on the last stage for the loss).
    ``TrainStep`` hands the first stage its inputs already in the parameter dtype, timesteps in fp32.
    float64 (the layout-equivalence tests, docs/design.md section 6): megatron-core's layers are
    built in ``params_dtype``; the modules of our own (patch and text embeddings, head) are cast
    from their fp32 initialisation, so a float64 run starts from an fp32 run's weights exactly."""
    if cfg.params_dtype == torch.float64:
        return [c.double() for c in chunks]
    if not cfg.bf16:
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(cfg, c) for c in chunks]


def wrap_ddp(cfg: SD3Config, chunks: list[SD3Model], use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             bucket_size: Optional[int] = None) -> list[DistributedDataParallel]:
    """megatron DDP around each chunk. ``bucket_size``: parameters per communication bucket
    (``--ddp-bucket-size``; None: megatron's default). ``overlap_param_gather`` needs the
    distributed optimizer and ``overlap_grad_reduce`` (as Megatron-LM); with virtual stages the
    all-gathers are aligned with the interleaved schedule (``align_param_gather``: the schedule
    starts each chunk's gather through ``config.param_sync_func``)."""
    if overlap_param_gather and not (use_distributed_optimizer and overlap_grad_reduce):
        raise ValueError("overlap_param_gather needs use_distributed_optimizer and overlap_grad_reduce")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.params_dtype != torch.float64, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False,
        overlap_param_gather=overlap_param_gather,
        align_param_gather=overlap_param_gather and len(chunks) > 1, bucket_size=bucket_size)
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
    if ddp_chunks[0].ddp_config.align_param_gather:
        cfg.param_sync_func = [m.start_param_sync for m in ddp_chunks]
    return optimizer


def finalize_grads_over_samples(global_samples: int):
    """``config.finalize_model_grads_func`` for a step whose loss count is the global batch's
    number of samples (``training/step.py``): megatron-core's ``finalize_model_grads`` without
    its ``num_tokens`` (which it broadcasts over PP, all-reduces over DP, then tests with
    ``num_tokens > 0``: a host read every iteration), followed by the same division, by the
    count the host already knows."""
    if global_samples <= 0:
        raise ValueError(f"global batch of {global_samples} samples: it must be positive")
    scaling = 1.0 / global_samples

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        for chunk in model:
            chunk.scale_gradients(scaling)

    return finalize


@contextmanager
def params_synced(ddp_chunks):
    """The model's parameters up to date inside the block, also with ``overlap_param_gather``.

    Megatron-LM's ``disable_forward_pre_hook`` (which finishes every outstanding parameter
    all-gather synchronously) before, and ``enable_forward_pre_hook`` after: what its training
    loop does around checkpoint saves. Nothing happens without ``overlap_param_gather``."""
    hooked = [m for m in ddp_chunks if getattr(m, "use_forward_hook", False)]
    for m in hooked:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in hooked:
            m.enable_forward_pre_hook()


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
                   overlap_param_gather: bool = False, ddp_bucket_size: Optional[int] = None,
                   torch_compile: bool = False, torch_compile_mode: str = "default",
                   scheduler: Optional[dict] = None,
                   ema_decay: float = 0.0, ema_update_interval: int = 1, ema_warmup: str = "none",
                   ema_inv_gamma: float = 1.0, ema_power: float = 2 / 3) -> Built:
    """Model chunks, DDP, optimizer (and optionally compiled blocks, LR scheduler, EMA).

    ``optimizer``: ``OptimizerConfig`` fields (``lr``, ``weight_decay``, ``clip_grad``, ...);
    ``optimizer`` defaults to "adam", and ``bf16``, ``params_dtype`` and
    ``use_distributed_optimizer`` come from ``cfg`` and the arguments here, so that optimizer,
    model and DDP cannot disagree. ``scheduler``: ``OptimizerParamScheduler`` keyword arguments
    (None: no scheduler). ``ema_decay`` > 0 keeps an EMA of the optimizer's fp32 master weights
    (``training/ema.py``; ``ema_warmup`` / ``ema_inv_gamma`` / ``ema_power``: diffusers' EMAModel warmup).
    ``torch_compile_mode``: see ``check_compile_mode`` (refused here as in preflight).
    """
    check_compile_mode(torch_compile_mode, torch_compile=torch_compile, transformer_impl=transformer_impl)
    opt_fields = {"optimizer": "adam", **(optimizer or {})}
    for k in ("bf16", "params_dtype", "use_distributed_optimizer", "overlap_param_gather"):
        if k in opt_fields:
            raise ValueError(f"build_training: optimizer field {k!r} is set from the model config / "
                             f"the use_distributed_optimizer argument; leave it out")
    opt_config = OptimizerConfig(bf16=cfg.bf16, params_dtype=cfg.params_dtype,
                                 use_distributed_optimizer=use_distributed_optimizer,
                                 overlap_param_gather=overlap_param_gather, **opt_fields)
    chunks = wrap_float16(cfg, build_model(cfg, transformer_impl=transformer_impl))
    ddp = wrap_ddp(cfg, chunks, use_distributed_optimizer=use_distributed_optimizer,
                   overlap_grad_reduce=overlap_grad_reduce, overlap_param_gather=overlap_param_gather,
                   bucket_size=ddp_bucket_size)
    opt = build_optimizer(cfg, ddp, opt_config)
    compiled = compile_blocks(chunks, torch_compile_mode) if torch_compile else 0
    sched = OptimizerParamScheduler(opt, **scheduler) if scheduler is not None else None
    models = [unwrap(m) for m in ddp]
    ema = EMA(models, ema_decay, ema_update_interval, optimizer=opt, warmup=ema_warmup, inv_gamma=ema_inv_gamma,
              power=ema_power) if ema_decay > 0 else None
    return Built(cfg=cfg, chunks=chunks, ddp=ddp, optimizer=opt, scheduler=sched, ema=ema,
                 compiled_blocks=compiled, models=models)
