"""CPU mode: let the real megatron-core code paths run on CPU with the gloo backend.

megatron-core 0.16 assumes CUDA in a handful of places that the CPU tests and the CPU demo go
through: the pipeline schedules' token counters (``device="cuda"``), the p2p shape/receive buffers
and DDP grad buffers (``torch.cuda.current_device()``), the optimizers' scalar tensors, the grad
norm / clipping helpers, the distributed optimizer's ``param.type() == 'torch.cuda.FloatTensor'``
checks, the checkpoint saver's small consistency all-reduces, and the tensor-parallel RNG tracker
(``model_parallel_cuda_manual_seed``), which keeps CUDA generator states.

``enable_cpu_mode()`` patches exactly those, and only when CUDA is absent (a GPU run never goes
through this module: it raises if CUDA is available). Nothing in site-packages is edited; every
patch is a module attribute of a megatron module (or, for the type-name checks, a patch that only
exists for the duration of one megatron call). Every patch names megatron-core internals of one
release: :func:`enable_cpu_mode` first calls ``megatron_sd3.compat.require_supported_megatron_core``,
so another megatron-core version fails with one line instead of a wrong patch. The patches, all
in ``_PATCHES`` below:

1. ``torch`` -> :class:`_CpuTorch` in the modules listed in ``_CUDA_ALLOCATING_MODULES``.
   ``_CpuTorch`` forwards every attribute to the real ``torch`` except
   * tensor factories (``zeros``, ``empty``, ``tensor``, ...): a ``device`` that names CUDA
     (``"cuda"``, ``"cuda:N"``, an int index, ``torch.device("cuda")``) becomes ``"cpu"``;
   * ``autocast("cuda", ...)`` becomes ``autocast("cpu", ...)``;
   * ``torch.cuda`` -> :class:`_CpuCudaShim`: ``current_device()`` returns ``"cpu"``,
     ``synchronize``/``empty_cache``/``set_device`` are no-ops, ``device_count()`` is 1 (the CPU
     plays the one local device; it is used as ``rank % device_count()``), and the RNG functions
     (``get_rng_state``, ``set_rng_state``, ``manual_seed``, ``manual_seed_all``) act on the CPU
     default generator, which is the generator CPU tensors (dropout, init) actually draw from.
     Any other ``torch.cuda`` attribute is the real one.
   Only code *inside those modules* sees the proxy; the rest of the process is untouched.
2. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> CPU default
   generator versions. The originals use ``torch.cuda.default_generators`` and ``_lazy_call``,
   which on a CPU build silently queue the call forever. With (1) and (2) megatron's own
   ``CudaRNGStatesTracker`` and ``model_parallel_cuda_manual_seed`` run unchanged: the tracker
   holds CPU generator states, seeded exactly as on GPU (data-parallel ``seed``, tensor-parallel
   ``seed + 2718 + tp_rank``, expert ``seed + 1024 + 100 * ep_rank + etp_rank``), and
   ``tracker.fork()`` swaps the CPU default generator. A logging filter drops the tracker's
   "CPU RNG state changed within GPU RNG context" warning, which is expected and meaningless when
   the "GPU" generator *is* the CPU generator.
3. ``param.type() == 'torch.cuda.FloatTensor'`` style checks in
   ``DistributedOptimizer._build_model_and_main_param_groups``,
   ``Float16OptimizerWithFloat16Params.__init__`` and ``clip_grad_by_total_norm_fp32``: those
   calls are wrapped so that, while they run, a CPU tensor's ``.type()`` (no arguments) reports
   the ``torch.cuda.*`` name on the calling thread (other threads see the normal name).
   ``Tensor.type`` is put back as soon as the outermost wrapped call returns.
4. The distributed optimizer on torch's AdamW (megatron's fallback without TE/apex, which is
   always the case on CPU; only patched when ``distrib_optimizer.HAVE_APEX_OR_TE`` is False):
   * ``DistributedOptimizer.sharded_state_dict(..., is_loading=True)`` on a fresh optimizer
     first allocates zero Adam state with ``step`` 0 (``state_dict()`` otherwise asserts on the
     missing per-param ``step``); the checkpoint overwrites it.
   * ``DistributedOptimizer.load_state_dict`` afterwards gives each param its own ``step``
     tensor (megatron assigns one shared tensor, which AdamW then increments once per param per
     step: wrong bias correction after a resume).

Tested on CPU (tests/multiprocess/test_cpu_mode.py): 1F1B with PP=2, TP=2, DP=2, DDP (with and without
overlap_grad_reduce), FP32Optimizer, Float16OptimizerWithFloat16Params (bf16), the distributed
optimizer, grad clipping, finalize_model_grads with per-token loss, dist_checkpointing save/load
(``dp_reshardable``), the RNG tracker; sequence parallelism (its all-gather / reduce-scatter
buffers, tests/multiprocess/test_parallel.py) and the distributed optimizer's overlapped parameter all-gather.
Smoke-tested by hand: ``use_cpu_initialization=False``. Not covered (they fail loudly if reached): fp16 loss-scaler
state loading (``.cuda()``), CUDA graphs, several distributed-optimizer instances (CUDA streams),
fully-parallel checkpoint loading (``exchange_utils`` ``.cuda()``), megatron FSDP, Transformer
Engine, ``model_parallel_cuda_manual_seed(use_cudagraphable_rng=True)``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import types
from typing import Any, Callable, Dict, List, Tuple

import torch

__all__ = ["enable_cpu_mode", "is_cpu_mode_enabled", "cpu_model_parallel_manual_seed"]

_ENABLED = False
_LOCK = threading.Lock()
_REAL_TORCH = torch

# Modules whose code allocates on CUDA / calls torch.cuda.* on the CPU paths we use. Each one gets
# the `_CpuTorch` proxy as its module-global `torch`. Why each is listed (hit by
# tests/multiprocess/test_cpu_mode.py, and for sequence parallelism by tests/multiprocess/test_parallel.py):
_CUDA_ALLOCATING_MODULES: Tuple[Tuple[str, str], ...] = (
    ("megatron.core.pipeline_parallel.schedules",
     'total_num_tokens = torch.zeros([], ..., device="cuda") in every schedule'),
    ("megatron.core.pipeline_parallel.p2p_communication",
     "shape and receive buffers on torch.cuda.current_device(); torch.cuda.synchronize()"),
    ("megatron.core.distributed.param_and_grad_buffer",
     "DDP grad (and distributed-optimizer param) buffers on torch.cuda.current_device()"),
    ("megatron.core.optimizer.optimizer",
     "MixedPrecision/FP32 optimizers' found_inf / _scale / _scale_one tensors on 'cuda'"),
    ("megatron.core.optimizer.clip_grads",
     "grad-norm, clipping and count-zeros buffers on 'cuda'"),
    ("megatron.core.utils",
     "local_multi_tensor_l2_norm (the no-apex grad-norm kernel) returns a 'cuda' tensor"),
    ("megatron.core.tensor_parallel.random",
     "RNG tracker: torch.cuda.get_rng_state / torch.cuda.manual_seed"),
    ("megatron.core.tensor_parallel.mappings",
     "TP all-gather (gather_output) and sequence-parallel buffers on current_device()"),
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver",
     "save finalisation all-reduce on current_device()"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async",
     "torch.cuda.synchronize() before staging tensors for writing"),
    ("megatron.core.dist_checkpointing.strategies.async_utils",
     "async save (--async-save): torch.cuda.synchronize() before forking the writer, and the "
     "all-ranks-done / finalisation all-reduces on current_device()"),
    ("megatron.core.tensor_parallel.layers",
     "weights on current_device() when use_cpu_initialization=False; SP all-gather buffer"),
    ("megatron.core.optimizer.distrib_optimizer",
     "optimizer-state shards on current_device() in load_state_dict of a fresh optimizer"),
)

_FACTORIES = frozenset(
    {
        "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
        "randint", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    }
)


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # torch.cuda.current_device() style index
        return True
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)  # pinning needs CUDA; meaningless for a CPU tensor
        return fn(*args, **kwargs)

    return wrapper


class _CpuCudaShim(types.ModuleType):
    """Stand-in for ``torch.cuda`` inside patched megatron modules: the CPU is the device."""

    def __init__(self):
        super().__init__("megatron_sd3.testing.cpu_mode.cuda")

    # Device management: the CPU plays the single local device.
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def set_device(_device):
        return None

    @staticmethod
    def synchronize(_device=None):
        return None

    @staticmethod
    def empty_cache():
        return None

    # RNG: CPU tensors draw from the CPU default generator, so that is "the device generator".
    @staticmethod
    def get_rng_state(device="cuda"):
        return _REAL_TORCH.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        _REAL_TORCH.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        _REAL_TORCH.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        _REAL_TORCH.manual_seed(seed)

    def __getattr__(self, name):  # everything else: the real torch.cuda
        return getattr(_REAL_TORCH.cuda, name)


class _CpuTorch(types.ModuleType):
    """Stand-in for ``torch`` inside patched megatron modules (see module docstring, patch 1)."""

    def __init__(self):
        super().__init__("megatron_sd3.testing.cpu_mode.torch")
        self.cuda = _CpuCudaShim()
        self._factories: Dict[str, Callable] = {}

    def autocast(self, device_type, *args, **kwargs):
        if device_type == "cuda":
            device_type = "cpu"
        return _REAL_TORCH.autocast(device_type, *args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(_REAL_TORCH, name)
        if name in _FACTORIES:
            wrapped = self._factories.get(name)
            if wrapped is None:
                wrapped = self._factories[name] = _cpu_factory(attr)
            return wrapped
        return attr


_CPU_TORCH = _CpuTorch()


# --- patch 2: CPU versions of megatron's CUDA RNG state accessors ------------------------------
def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    """CPU stand-in for ``tensor_parallel.random._get_cuda_rng_state``."""
    if graph_safe:
        raise RuntimeError("CPU mode: graph-safe (CUDA graph) RNG states do not exist on CPU")
    return _REAL_TORCH.get_rng_state()


def _set_cpu_rng_state(new_state, device: int = -1, graph_safe: bool = False):
    """CPU stand-in for ``tensor_parallel.random._set_cuda_rng_state``."""
    if graph_safe:
        raise RuntimeError("CPU mode: graph-safe (CUDA graph) RNG states do not exist on CPU")
    _REAL_TORCH.set_rng_state(new_state)


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_FORK_WARNING_FILTER = _DropForkWarning()


# --- patch 3: CUDA type names for CPU tensors during specific megatron calls -------------------
_TLS = threading.local()
_ORIG_TENSOR_TYPE = torch.Tensor.type
_TYPE_INSTALL_LOCK = threading.Lock()
_TYPE_INSTALL_COUNT = 0


def _tensor_type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
    name_only = dtype is None and not kwargs
    result = _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    if name_only and getattr(_TLS, "depth", 0) > 0 and isinstance(result, str):
        if self.device.type == "cpu" and result.startswith("torch.") and ".cuda." not in result:
            return "torch.cuda." + result[len("torch."):]
    return result


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Wrap ``fn`` so CPU tensors' ``.type()`` reports ``torch.cuda.*`` while it runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _TYPE_INSTALL_COUNT
        with _TYPE_INSTALL_LOCK:
            if _TYPE_INSTALL_COUNT == 0:
                torch.Tensor.type = _tensor_type_reporting_cuda
            _TYPE_INSTALL_COUNT += 1
        _TLS.depth = getattr(_TLS, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _TLS.depth -= 1
            with _TYPE_INSTALL_LOCK:
                _TYPE_INSTALL_COUNT -= 1
                if _TYPE_INSTALL_COUNT == 0:
                    torch.Tensor.type = _ORIG_TENSOR_TYPE

    wrapper.__cpu_mode_wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


# --- patch 4: the distributed optimizer on torch.optim.AdamW (megatron's fallback w/o TE/apex) ---
def _with_torch_adam_state_for_load(sharded_state_dict: Callable) -> Callable:
    """Allocate empty Adam state (step 0) before building a *loading* sharded state dict.

    DistributedOptimizer.state_dict() reads the per-param "step" that only torch's AdamW keeps
    and asserts there is exactly one value; a freshly built optimizer has no state at all. The
    zeros allocated here are overwritten by the checkpoint (megatron's own
    _init_optimizer_states_with_dummy_values would instead take a real step, which moves the
    parameters when weight decay is on, and leaves step=1 behind).
    """

    @functools.wraps(sharded_state_dict)
    def wrapper(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        adam = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if is_loading and adam and len(self.optimizer.state) == 0:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    return wrapper


def _with_unshared_torch_adam_steps(load_state_dict: Callable) -> Callable:
    """After DistributedOptimizer.load_state_dict, give every param its own 'step' tensor.

    On the non-TE/apex path megatron assigns one `torch.tensor(step)` object to every param's
    state; torch's AdamW increments `state["step"]` in place per param, so after one step the
    count is step + n_params and bias correction is wrong (and the dp_reshardable param-state copy
    then writes into that shared tensor). The value is the checkpoint's param-group step.
    """

    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        result = load_state_dict(self, state_dict)
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {float(g["step"]) for g in groups if "step" in g}
        if len(steps) == 1:
            step = steps.pop()
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)
        return result

    return wrapper


# Record of what was patched: (description, module/object, attribute, original value).
_PATCHES: List[Tuple[str, Any, str, Any]] = []


def _patch(obj: Any, attr: str, value: Any, why: str) -> None:
    original = obj.__dict__.get(attr) if isinstance(obj, type) else getattr(obj, attr)
    _PATCHES.append((why, obj, attr, original))
    setattr(obj, attr, value)


def is_cpu_mode_enabled() -> bool:
    return _ENABLED


def enable_cpu_mode() -> None:
    """Patch megatron-core so its training/checkpointing paths run on CPU (gloo). Idempotent.

    Raises RuntimeError when CUDA is available: a GPU run must never go through CPU mode.
    """
    global _ENABLED
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_sd3.testing.cpu_mode.enable_cpu_mode() refused: CUDA is available; CPU mode is only "
            "for machines without a GPU (use the nccl/cuda path instead)."
        )
    from megatron_sd3.compat import require_supported_megatron_core

    require_supported_megatron_core()
    with _LOCK:
        if _ENABLED:
            return

        # 1. torch -> _CpuTorch in the CUDA-allocating modules.
        for modname, why in _CUDA_ALLOCATING_MODULES:
            mod = importlib.import_module(modname)
            _patch(mod, "torch", _CPU_TORCH, why)

        # 2. RNG state accessors.
        from megatron.core.tensor_parallel import random as mrandom

        _patch(mrandom, "_get_cuda_rng_state", _get_cpu_rng_state,
               "CUDA generator states -> CPU default generator")
        _patch(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state,
               "_lazy_call never runs without CUDA -> set CPU default generator now")
        if _FORK_WARNING_FILTER not in logging.getLogger(mrandom.__name__).filters:
            logging.getLogger(mrandom.__name__).addFilter(_FORK_WARNING_FILTER)

        # 3. 'torch.cuda.*Tensor' type-name checks.
        from megatron.core.optimizer import clip_grads as mclip
        from megatron.core.optimizer import distrib_optimizer as mdistopt
        from megatron.core.optimizer import optimizer as mopt

        dist_cls = mdistopt.DistributedOptimizer
        build = dist_cls.__dict__["_build_model_and_main_param_groups"]
        _patch(dist_cls, "_build_model_and_main_param_groups",
               type(build)(_with_cuda_type_names(build.__func__)),  # keep class/staticmethod
               "param.type() in ['torch.cuda.HalfTensor', ...] / == 'torch.cuda.FloatTensor'")
        f16_cls = mopt.Float16OptimizerWithFloat16Params
        _patch(f16_cls, "__init__", _with_cuda_type_names(f16_cls.__dict__["__init__"]),
               "param.type() == 'torch.cuda.FloatTensor' / Half / BFloat16 checks")
        clip_cpu = _with_cuda_type_names(mclip.clip_grad_by_total_norm_fp32)
        for mod in (mclip, mopt):
            _patch(mod, "clip_grad_by_total_norm_fp32", clip_cpu,
                   "assert param.grad.type() == 'torch.cuda.FloatTensor'")

        # 4. Torch-optimizer fallback of the distributed optimizer (no TE/apex, always so on CPU).
        if not getattr(mdistopt, "HAVE_APEX_OR_TE", True):
            _patch(dist_cls, "sharded_state_dict",
                   _with_torch_adam_state_for_load(dist_cls.__dict__["sharded_state_dict"]),
                   "fresh torch AdamW has no per-param 'step': state_dict() asserts on load")
            _patch(dist_cls, "load_state_dict",
                   _with_unshared_torch_adam_steps(dist_cls.__dict__["load_state_dict"]),
                   "load gives all params ONE shared 'step' tensor (AdamW bumps it per param)")

        _ENABLED = True


def cpu_model_parallel_manual_seed(seed: int, **kwargs) -> None:
    """CPU equivalent of megatron's ``model_parallel_cuda_manual_seed`` (same seed arithmetic).

    Runs megatron's own ``model_parallel_cuda_manual_seed`` with CPU mode's RNG patches, so the
    tracker holds CPU generator states: default/data-parallel ``seed``, tensor-parallel
    ``seed + 2718 + tp_rank``, expert ``seed + 1024 + 100 * ep_rank + etp_rank``. Leaves the CPU
    default generator seeded with ``seed`` (what the CUDA generator would be on a GPU).
    """
    if not _ENABLED:
        raise RuntimeError("cpu_model_parallel_manual_seed needs enable_cpu_mode() first")
    from megatron.core.tensor_parallel import random as mrandom

    kwargs.setdefault("force_reset_rng", True)
    mrandom.model_parallel_cuda_manual_seed(seed, **kwargs)


def _disable_cpu_mode_for_tests() -> None:
    """Undo every patch (tests only; a process normally keeps CPU mode for its lifetime)."""
    global _ENABLED
    with _LOCK:
        for _why, obj, attr, original in reversed(_PATCHES):
            if original is None and isinstance(obj, type):
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)
        _PATCHES.clear()
        _ENABLED = False
