"""megatron-core's fused kernels compile at their first call, not at import (megatron_sd3/lazy_compile.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_sd3.lazy_compile import compile_on_first_call

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_importing_the_training_loop_builds_no_compiler_backend():
    """A fresh interpreter (as every rank and tool is): after the training loop's imports,
    megatron-core's jit_fuser is compile_on_first_call, and neither dynamo nor inductor is imported."""
    code = ("import json, sys, megatron_sd3.training.pretrain\n"
            "from megatron.core import jit\n"
            "from megatron.core.fusions import fused_bias_gelu\n"
            "print(json.dumps({'fuser': jit.jit_fuser.__name__, 'kernel': fused_bias_gelu.bias_gelu.__name__,\n"
            "  'lazy': getattr(fused_bias_gelu.bias_gelu, 'compile_on_first_call', False),\n"
            "  'loaded': sorted(m for m in ('torch._dynamo', 'torch._inductor.compile_fx') if m in sys.modules)}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {"fuser": "compile_on_first_call", "kernel": "bias_gelu", "lazy": True, "loaded": []}, got


def _frames():
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def test_a_kernel_compiles_at_its_first_call_and_gives_the_eager_values():
    torch._dynamo.reset()

    def gelu_bias(x, b):
        return torch.nn.functional.gelu(x + b, approximate="tanh") * 2

    kernel = compile_on_first_call(gelu_bias, backend="eager")
    before = _frames()
    assert _frames() == before  # decorating compiled nothing
    x, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.equal(kernel(x, b), gelu_bias(x, b))
    assert _frames() > before  # dynamo traced it at the first call
    also = compile_on_first_call(backend="eager")(gelu_bias)  # the decorator-with-options form
    assert torch.equal(also(x, b), gelu_bias(x, b)) and also.__wrapped__ is gelu_bias


def test_inside_a_traced_region_the_kernel_is_inlined(monkeypatch):
    """torch.compile of a caller traces through the kernel's plain function as one graph
    (fullgraph: a graph break raises), building no compiled kernel of its own there, as dynamo does
    with a nested torch.compile'd function."""
    torch._dynamo.reset()
    kernel = compile_on_first_call(lambda x: torch.sin(x) + 1)
    caller = torch.compile(lambda x: kernel(x * 2) * 3, backend="eager", fullgraph=True)
    built, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: built.append(fn) or real(fn, **kw))
    x = torch.randn(5, dtype=torch.float64)
    assert torch.equal(caller(x), (torch.sin(x * 2) + 1) * 3)
    assert built == []

