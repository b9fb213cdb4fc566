#!/usr/bin/env python
"""The FP8 cast kernels of one compiled joint block, counted on CPU from inductor's generated code.

    python tools/fp8_cast_kernels.py [--regions block|gemm] [--weight-scales step|gemm]
                                     [--fp8-format hybrid|e4m3] [--json]

Builds the tiny preset in FP8 (torchao tensorwise, every block GEMM), compiles joint block 2 with
``torch.compile`` (``--regions block``: the block as one graph, what ``--torch-compile`` does;
``gemm``: a graph break before every FP8 GEMM, each GEMM and its casts a region of its own, the
benchmark's ``fp8-per-gemm`` variant), runs its forward and backward once (``--weight-scales
step``, the default: inside the training step's ``weight_scales_for_step``, the weights' scales
computed before the block, as ``TrainStep`` runs it; ``gemm``: each GEMM computes its weight's
scale, as outside a training step), and classifies every kernel inductor generated (``torch._inductor.utils.run_and_get_code``):

* ``fp8_writing``: kernels with an FP8 output (a cast: the amax, scale and cast of an operand);
* ``cast_only``: of those, the kernels that do nothing but the cast (every op inductor fused into
  them is a cast, scale, amax or layout op: ``_to_copy``, ``abs``, ``max``, ``clamp``, ``mul``,
  ``reciprocal``, views, transposes); the others compute the operand too (the norm and modulate,
  GELU, attention output layout, or the backward's gradient ops) and write it in FP8 directly;
* ``scale_only``: kernels without FP8 output made only of those ops (a scale computed apart from
  its cast, from an amax fused elsewhere);
* ``amax_kernels``: kernels that reduce an amax (``abs`` and ``max`` among their ops);
* ``amax_reductions``: per compiled module (forward, backward), the amax reductions in its code
  (an absolute value accumulated into a running max), however inductor grouped them;
* ``scaled_mm``: the FP8 GEMMs (extern kernels).

On CPU inductor writes C++ kernels (a GPU gets Triton kernels, fused by the same scheduler, with a
reduction kept apart from its consumers): the counts say which casts the compiler fuses into their
producer, not how fast a GPU runs them. ``--json``: one line with the counts and kernel names.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the aten ops of a cast (amax, scale, saturate, convert) and of the layouts torchao gives operands
CAST_OPS = ("_scaled_mm", "_to_copy", "abs", "amax", "max", "clamp", "mul", "reciprocal", "div", "t", "view",
            "_unsafe_view", "clone", "permute", "transpose", "slice", "split", "unsqueeze", "squeeze", "expand",
            "reshape", "select")
# an amax in inductor's C++: an absolute value accumulated into a running max
_AMAX = re.compile(r"auto (tmp\d+) = tmp\d+\.abs\(\);\s*\n\s*tmp_acc\w* = (?:at::vec::maximum|max_propagate_nan)\(tmp_acc\w*, \1\)")
_KERNEL = re.compile(r"^(cpp_fused_\w+|triton_\w+) = async_compile\.\w+\((\[[^\]]*\])?", re.M)


def ops_of(kernel: str) -> list[str]:
    """The aten ops in an inductor kernel name (``cpp_fused_<op>_<op>..._<n>``), longest match first."""
    body = re.sub(r"^(cpp_fused|triton_\w+?_fused)_", "", kernel)
    body = re.sub(r"_\d+$", "", body)
    known = sorted(set(CAST_OPS) | {"native_layer_norm", "native_layer_norm_backward", "gelu_backward",
                                     "silu_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
                                     "_scaled_dot_product_flash_attention_for_cpu", "slice_backward"},
                   key=len, reverse=True)
    ops, rest = [], body
    while rest:
        for k in known:
            if rest.startswith(k) and (len(rest) == len(k) or rest[len(k)] == "_"):
                break
        else:  # an op not in the list: up to the next separator (a leading underscore kept)
            k = re.match(r"_?[^_]+", rest).group(0)
        ops.append(k)
        rest = rest[len(k) + 1:]  # the op and one separator
    return ops


def classify(codes: list[str]) -> dict:
    """Counts over the generated modules ``codes`` (the wrapper code inductor wrote)."""
    kernels, fp8, cast_only, scale_only, amax = [], [], [], [], []
    scaled_mm = 0
    amax_reductions = [len(_AMAX.findall(code)) for code in codes]
    for code in codes:
        scaled_mm += len(re.findall(r"extern_kernels\._scaled_mm\(|aten\._scaled_mm\.default\(", code))
        for name, args in _KERNEL.findall(code):
            kernels.append(name)
            writes_fp8 = bool(re.search(r"'at::Float8_\w+\*'", args or ""))
            ops = set(ops_of(name))
            only_cast_ops = ops <= set(CAST_OPS)
            if {"abs", "max"} <= ops or "amax" in ops:
                amax.append(name)
            if writes_fp8:
                fp8.append(name)
                if only_cast_ops:
                    cast_only.append(name)
            elif only_cast_ops:  # a scale (amax -> reciprocal) computed apart from its cast
                scale_only.append(name)
    return dict(kernels=len(kernels), fp8_writing=len(fp8), cast_only=len(cast_only), scale_only=len(scale_only),
                amax_kernels=len(amax), amax_reductions=amax_reductions, scaled_mm=scaled_mm, fp8_kernels=fp8, cast_only_kernels=cast_only, scale_only_kernels=scale_only)


def count(regions: str = "block", fp8_format: str = "hybrid", weight_scales: str = "step") -> dict:
    """Compile joint block 2 of the tiny FP8 model, run forward + backward once, classify."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from megatron_sd3.backends import torchao as fp8_torchao
    from megatron_sd3.config import make_config
    from megatron_sd3.convert import ensure_single_process_parallel_state
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.testing.helpers import block_inputs, tiny_forward_inputs

    ensure_single_process_parallel_state()
    cfg = make_config("tiny", zero_init_adaln=False, parallel={"fp8": fp8_format})
    model = SD3Model(cfg)
    args, kwargs = block_inputs(model, tiny_forward_inputs(cfg, micro_batch=2))
    lift = lambda t: t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args, kwargs = [lift(a) for a in args], {k: lift(v) for k, v in kwargs.items()}
    block = model.blocks[1]
    compiled = torch.compile(block)
    old, fp8_torchao.COMPILE_REGIONS = fp8_torchao.COMPILE_REGIONS, regions
    torch._dynamo.reset()

    def step():
        once = fp8_torchao.weight_scales_for_step([model], cfg) if weight_scales == "step" else contextlib.nullcontext()
        with once, model.backend.layer_fp8_context(cfg, block.layer_number - 1):
            out = compiled(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()

    try:
        _, codes = run_and_get_code(step)
    finally:
        fp8_torchao.COMPILE_REGIONS = old
        torch._dynamo.reset()
    return dict(regions=regions, weight_scales=weight_scales, fp8_format=fp8_format, modules=len(codes),
                **classify(codes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regions", choices=["block", "gemm"], default="block")
    p.add_argument("--weight-scales", choices=["step", "gemm"], default="step")
    p.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default="hybrid")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    out = count(a.regions, a.fp8_format, a.weight_scales)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"joint block, compiled ({a.regions} regions, weight scales per {a.weight_scales}), FP8 {a.fp8_format}, "
          "forward + backward, CPU inductor:")
    print(f"  {out['kernels']} kernels in {out['modules']} compiled modules, {out['scaled_mm']} FP8 GEMMs")
    print(f"  {out['amax_kernels']} kernels reduce an amax; amax reductions per module: {out['amax_reductions']}")
    print(f"  {out['fp8_writing']} kernels write FP8, {out['cast_only']} of them only cast:")
    for k in out["cast_only_kernels"]:
        print(f"    {k}")
    print(f"  {out['scale_only']} kernels compute a scale alone:")
    for k in out["scale_only_kernels"]:
        print(f"    {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
