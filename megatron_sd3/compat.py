"""The one place where megatron_sd3 depends on megatron-core internals that have no public hook.

Everything here is tied to the megatron-core versions in :data:`SUPPORTED_MEGATRON_CORE`;
importing this module on another version raises one line saying which versions are supported
(every user of a private megatron-core name imports this module, so an unsupported install fails
before any model is built, not deep inside a forward pass).

What is here, and why no public hook exists (see ``docs/design.md``, section "Backends"):

* :class:`GemmOverride`: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` route
  their local GEMM through the private ``_forward_impl(input, weight, bias,
  gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, grad_output_buffer,
  wgrad_deferral_limit, tp_group)`` (0.16 calls it with keywords only). A backend that swaps the
  GEMM (``F.linear`` fast path, torchao float8) subclasses :class:`GemmOverride` and implements
  the public-named ``local_gemm``; nothing else in the package overrides ``_forward_impl``.
* :func:`set_te_attention_backend`: megatron's mapping of ``config.attention_backend`` onto
  Transformer Engine's ``NVTE_*`` variables is the private
  ``LanguageModule._set_attention_backend``, which reads only ``self.config``.
* :func:`checkpoint_writer_results_queue`: megatron-core's torch_dist writer collects its write
  results through a queue served by a spawned multiprocessing manager, created on the first save
  and kept in the private ``filesystem_async._results_queue``. That server process never watches
  its parent: a rank that dies without running its exit handlers (SIGKILL, or SIGTERM when its
  launcher died) would leave it, and the resource tracker beside it, running for ever. This
  function creates the queue first, with a server that dies with its rank.
* :func:`owned_reduced_grad`: the part of a parameter's gradient that a rank holds after DDP's
  reduction (all of it with the plain optimizer; the reduce-scattered shard of its bucket with
  the distributed optimizer). DDP exposes its buffers (``buffers``, ``param_index_map``,
  ``buckets``) without a public accessor for a parameter's shard; ``DistributedOptimizer``
  computes the same ranges privately. Used by ``training/grad_share.py``.
* :func:`require_supported_megatron_core`: called by the CPU mode
  (``megatron_sd3.testing.cpu_mode``), whose patches name private megatron-core functions.
"""
from __future__ import annotations

from typing import Optional

from megatron.core import package_info

#: (major, minor) releases of megatron-core whose private names this module relies on.
SUPPORTED_MEGATRON_CORE = ((0, 16),)


def megatron_core_version() -> tuple[int, int, int]:
    return (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))


def require_supported_megatron_core(version: Optional[tuple] = None) -> None:
    """One clear line when the installed megatron-core is not a supported release."""
    version = megatron_core_version() if version is None else tuple(version)
    if tuple(version[:2]) not in SUPPORTED_MEGATRON_CORE:
        have = ".".join(map(str, version))
        want = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_MEGATRON_CORE)
        raise RuntimeError(
            f"megatron-core {have} is not supported by megatron_sd3 (it relies on internals of "
            f"megatron-core {want}); install a supported release, e.g. "
            f"pip install 'megatron-core=={want.split(',')[0].replace('.x', '.*')}'")


require_supported_megatron_core()


class GemmOverride:
    """Mixin before megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``.

    Subclasses implement :meth:`local_gemm`, which gets megatron's keyword arguments and returns
    the GEMM output (bias included when ``bias`` is given), or ``None`` to let megatron's own
    ``_forward_impl`` run. Everything around the GEMM (TP regions, all-reduce of the row layer's
    output, parameter handling) stays megatron's ``forward``.
    """

    def local_gemm(self, input, weight, **kwargs):  # pragma: no cover - overridden
        return None

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args:  # megatron-core 0.16 passes everything after weight by keyword
            raise TypeError("megatron_sd3.compat.GemmOverride expects megatron-core to call "
                            "_forward_impl with keyword arguments (as 0.16 does)")
        out = self.local_gemm(input, weight, **kwargs)
        if out is None:
            return super()._forward_impl(input, weight, **kwargs)
        return out


class _ConfigHolder:
    def __init__(self, config):
        self.config = config


def set_te_attention_backend(config) -> None:
    """megatron's own ``config.attention_backend`` -> ``NVTE_FLASH_ATTN`` / ``NVTE_FUSED_ATTN`` /
    ``NVTE_UNFUSED_ATTN`` mapping (what every megatron ``LanguageModule`` does at construction)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule._set_attention_backend(_ConfigHolder(config))


_results_manager = None


def checkpoint_writer_results_queue() -> None:
    """Before the first save: megatron-core's write-results queue, served by a manager process
    that gets SIGTERM from the kernel when its rank dies (see the module docstring). Idempotent."""
    global _results_manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_sd3.training import watchdog

    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError("megatron-core's filesystem_async has no _results_queue: this megatron-core "
                           "release is not one megatron_sd3 supports")
    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))  # what megatron-core uses: ctx.Manager()
    manager.start(initializer=watchdog.helper_dies_with_parent)
    _results_manager = manager  # the manager's finaliser shuts the server down at a clean exit
    filesystem_async._results_queue = manager.Queue()


def owned_reduced_grad(ddp, param):
    """This rank's part of ``param``'s gradient in megatron ``DistributedDataParallel`` ``ddp``'s
    buffers after the reduction (flat, a view): all of ``main_grad`` on data-parallel rank 0 and
    nothing elsewhere with the plain optimizer (all-reduced: the same on every rank), the
    intersection with this rank's equal shard of the bucket (``shard_buffer``) with the
    distributed optimizer (reduce-scattered)."""
    for buf in ddp.buffers:
        if param in buf.param_index_map:
            break
    else:
        raise KeyError("the parameter is in none of the DDP module's gradient buffers")
    rank, size = buf.data_parallel_group.rank(), buf.data_parallel_group.size()
    if not ddp.ddp_config.use_distributed_optimizer:
        flat = param.main_grad.view(-1)
        return flat if rank == 0 else flat[:0]
    start, end, b = buf.param_index_map[param]
    bucket = buf.buckets[b]
    shard = bucket.grad_data.numel() // size
    lo, hi = max(start, bucket.offset + rank * shard), min(end, bucket.offset + (rank + 1) * shard)
    return buf.grad_data[lo:max(lo, hi)]
