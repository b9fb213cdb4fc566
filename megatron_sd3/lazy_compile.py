"""megatron-core's fused kernels compile when first called, not when megatron-core is imported.

megatron-core decorates its fused element-wise kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add,
rotary, MoE routing, ...) with ``megatron.core.jit.jit_fuser``, which is ``torch.compile`` on
torch >= 2.2. ``torch.compile(fn)`` builds its inductor backend on the spot, so importing
megatron-core imports torch._dynamo and torch._inductor: about 4 of the 11 s a CPU process spends
importing ``megatron_sd3.training.pretrain`` (``python -X importtime``), paid by every rank, by
``launch.sh``'s checks and by every tool, whether or not any fused kernel runs (sd3_light's layers
call none of them on the local path). Here ``jit_fuser`` becomes :func:`compile_on_first_call`:
the same ``torch.compile(fn)``, made the first time ``fn`` is called; inside a region torch.compile
is already tracing, ``fn`` itself is called, which is what dynamo does with a nested compiled
function. :func:`install` (from the package's ``__init__``) sets it up for megatron-core's import;
when ``megatron.core.jit`` is already imported, nothing changes (docs/design.md, "Start-up").
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


def compile_on_first_call(fn=None, **options):
    """``torch.compile(fn, **options)``, built at ``fn``'s first call (usable as ``@decorator``,
    ``@decorator(**options)`` or ``decorator(fn)``)."""
    if fn is None:
        return functools.partial(compile_on_first_call, **options)
    compiled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        import torch

        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)

    call.compile_on_first_call = True
    return call


class _JitLoader(importlib.abc.Loader):
    """megatron.core.jit's own loader, then ``jit_fuser`` swapped if it is ``torch.compile``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = compile_on_first_call

    def __getattr__(self, name):  # get_source, get_filename, ...: tracebacks and inspect
        return getattr(self.loader, name)


class _JitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _JitLoader(spec.loader)
        return spec


def install() -> None:
    """Make megatron-core's ``jit_fuser`` compile on first call, if megatron-core is not imported yet."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _JitFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitFinder())
