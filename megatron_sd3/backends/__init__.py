"""Backends: what fills the joint block's spec, how FP8 is switched on, and what a backend needs.

A small registry (the idiom of torchtitan's ``train_spec.py``): each backend is ONE module that
registers a :class:`Backend` holding

* ``spec_provider()``: a megatron-core ``BackendSpecProvider`` (``models/backends.py`` /
  ``extensions/transformer_engine_spec_provider.py`` idiom) filling the block's ``ModuleSpec``;
* ``check(fp8_settings)``: availability and the FP8 rules of the backend, raising one line that
  names the problem and the fix;
* the FP8 context policy, as megatron-core's ``TransformerBlock.forward`` has it:
  ``pass_fp8_context(config)`` is entered once around all blocks of a forward pass, and
  ``layer_fp8_context(config, layer_no)`` around each block (``layer_no`` 0-based, global).
  For the ``delayed`` recipe the pass context is the FP8 region and the layer context is a no-op
  (one amax-reduction per pass); for the other recipes the pass context is a no-op and each layer
  opens its own (so ``--first-last-layers-bf16`` can keep a layer in high precision);
* ``step_context(chunks, config)``: around one iteration's forward and backward passes (the
  torchao backend computes its FP8 weight scales there, once per step).

Registered backends (``--transformer-impl`` picks the first or the last; ``local`` with FP8 on is
``torchao``):

``local``              megatron-core's parallel linears (``F.linear`` fast path), torch norms,
                       torch SDPA core attention; CPU and GPU; no FP8.
``torchao``            ``local`` with the linears' GEMMs in torchao float8 (tensorwise recipe,
                       TP-agreed amax); needs torchao.
``transformer_engine`` Transformer Engine modules under megatron-core's FP8 context; needs TE.

Backend modules are imported on first use, so asking for ``local`` never imports torchao or TE.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

from megatron_sd3.backends.fp8_settings import Fp8Settings

#: ``--transformer-impl`` choices (Megatron-LM's names).
TRANSFORMER_IMPLS = ("local", "transformer_engine")


@dataclass(frozen=True)
class Backend:
    name: str
    spec_provider: Callable[[], object]
    check: Callable[[Optional[Fp8Settings]], None]
    pass_fp8_context: Callable[[object], ContextManager]
    layer_fp8_context: Callable[[object, int], ContextManager]
    #: entered by the training step around an iteration's forward and backward passes, whose
    #: weights do not change: ``step_context(model_chunks, config)`` (what a backend can do once
    #: per step instead of once per micro batch; default nothing)
    step_context: Callable[[list, object], ContextManager] = lambda chunks, config: contextlib.nullcontext()


_MODULES = {
    "local": "megatron_sd3.backends.local",
    "torchao": "megatron_sd3.backends.torchao",
    "transformer_engine": "megatron_sd3.backends.transformer_engine",
}
_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_MODULES, *_REGISTRY]))


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; an unknown name is one line naming the choices."""
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]


def backend_name_for(transformer_impl: str, fp8: bool) -> str:
    """``--transformer-impl`` (and whether FP8 is on) -> the registered backend's name."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, "
                         f"got {transformer_impl!r}")
    if transformer_impl == "local":
        return "torchao" if fp8 else "local"
    return transformer_impl


def backend_for(transformer_impl: str, fp8: bool = False) -> Backend:
    return get_backend(backend_name_for(transformer_impl, fp8))


def check_backend(transformer_impl: str, fp8_settings: Optional[Fp8Settings] = None) -> Backend:
    """Refuse, before any work starts, what the chosen backend cannot run; return the backend."""
    backend = backend_for(transformer_impl, fp8_settings is not None)
    backend.check(fp8_settings)
    return backend


__all__ = ["Backend", "Fp8Settings", "TRANSFORMER_IMPLS", "backend_for", "backend_name_for",
           "backend_names", "check_backend", "get_backend", "register_backend"]
