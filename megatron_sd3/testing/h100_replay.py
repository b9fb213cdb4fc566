"""What an H100 makes of our FP8 GEMMs, checked on a CPU: ``torch._scaled_mm`` calls captured from a
training step and replayed through ``mmaemu``, an emulator of ``torch._scaled_mm`` as an H100 PCIe
computes it (cuBLASLt 12.8.3.14, bit for bit on its recorded evidence; ``pip install mmaemu``).

* :func:`capture_scaled_mm`: every ``torch._scaled_mm`` call made inside it, with its operands in
  their own layout (strides kept), scales, output dtype, ``use_fast_accum`` and the output the
  running kernel (here torch's CPU kernel) returned.
* :func:`h100_refusal`: ``None`` when cuBLASLt on an H100 accepts the call, else mmaemu's reason
  (its argument, layout, alignment, format and scope checks, run before any arithmetic).
* :func:`h100_output`: the H100's output bits for the call.
* :func:`cpu_h100_bound`: how far the CPU kernel's output may lie from the H100's, element by
  element, from the two kernels' arithmetic (below). mmaemu's documentation states the H100's
  arithmetic, not a bound against torch's CPU kernel; the bound is derived from that statement.

The bound. Let ``S = sum_k |a_ik b_kj|`` (the FP8 operands decoded exactly, in float64; every product
of two FP8 numbers is exact there), ``alpha = scale_a * scale_b``, ``nb = ceil(K / 32)``:

* H100 (mmaemu's ``hopper`` preset): the products are added in blocks of 32, aligned to the largest
  exponent of the block and the running sum, and truncated to 13 fraction bits. Each of a block's
  at most 33 terms (32 products and the running sum, all of magnitude <= S) loses less than
  ``2^-13 * S``: at most ``nb * 33 * 2^-13 * S`` over the call. Split-K partial sums (at most ``nb``)
  are added in fp32: ``nb * 2^-24 * S`` more.
* torch's CPU kernel: an fp32 GEMM, ``K`` fp32 additions: at most ``K * 2^-24 * S`` (first order).
* both epilogues: ``alpha`` rounded to fp32 and one fma (``2 * 2^-24`` relative), then the output
  rounded to its dtype (unit roundoff ``u``: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32), each output
  within ``u / (1 - u)`` of its own magnitude.

    |y_h100 - y_cpu| <= |alpha| * S * (nb * 33 * 2^-13 + (K + nb + 4) * 2^-24)
                        + 2 * u / (1 - u) * max(|y_h100|, |y_cpu|)

Out of scope (mmaemu raises for them): row-wise scales (``--fp8-recipe rowwise``), bias, autograd.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

PROFILE = "hopper"  # torch._scaled_mm on an H100 PCIe (mmaemu's default, validated)
NO_SPLIT_PROFILE = "hopper-ws0"  # the same H100 and arithmetic with a 0-byte workspace: never splits K
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


@dataclass
class ScaledMmCall:
    a: torch.Tensor
    b: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor
    out_dtype: torch.dtype
    use_fast_accum: bool
    out: torch.Tensor  # what the running kernel returned

    @property
    def signature(self) -> tuple:
        """Shapes, layouts, dtypes and flags: what decides whether and how an H100 runs the call."""
        return (tuple(self.a.shape), self.a.stride(), self.a.dtype, tuple(self.b.shape), self.b.stride(),
                self.b.dtype, self.out_dtype, self.use_fast_accum)

    def kwargs(self) -> dict:
        return dict(out_dtype=self.out_dtype, use_fast_accum=self.use_fast_accum)


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (the layout is part of what cuBLASLt checks)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu").copy_(t)


@contextlib.contextmanager
def capture_scaled_mm() -> Iterator[list]:
    """Records every ``torch._scaled_mm`` call inside the block (a list of :class:`ScaledMmCall`)."""
    calls: list = []
    orig = torch._scaled_mm

    def recording(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        out = orig(a, b, scale_a, scale_b, bias=bias, scale_result=scale_result, out_dtype=out_dtype,
                   use_fast_accum=use_fast_accum)
        if bias is not None or scale_result is not None:
            raise AssertionError("a _scaled_mm call with bias or scale_result: not what torchao's "
                                 "tensorwise recipe makes, and outside mmaemu's scope")
        calls.append(ScaledMmCall(_keep(a), _keep(b), scale_a.detach().cpu().clone(), scale_b.detach().cpu().clone(),
                                  out_dtype or a.dtype, bool(use_fast_accum), out.detach().cpu().clone()))
        return out

    torch._scaled_mm = recording
    try:
        yield calls
    finally:
        torch._scaled_mm = orig


def h100_refusal(call: ScaledMmCall) -> Optional[str]:
    """None when an H100's cuBLASLt accepts the call; else mmaemu's reason. mmaemu checks arguments,
    layouts, alignment, formats and scope before it decides split-K, so a call whose only objection
    is an unknown split-K decision (a shape outside the recorded table) is accepted."""
    import mmaemu

    plan = mmaemu.explain(call.a, call.b, call.scale_a, call.scale_b, profile=PROFILE, **call.kwargs())
    if plan.validation == "ok" or plan.validation[0] == "SplitKUnknownError":
        return None
    return f"{plan.validation[0]}: {plan.validation[1]}"


def h100_output(call: ScaledMmCall) -> torch.Tensor:
    """The H100's output: with the recorded split-K decision where mmaemu has one, else unsplit
    (the bound of :func:`cpu_h100_bound` covers any split)."""
    import mmaemu

    plan = mmaemu.explain(call.a, call.b, call.scale_a, call.scale_b, profile=PROFILE, **call.kwargs())
    profile = PROFILE if plan.validation == "ok" else NO_SPLIT_PROFILE
    with torch.inference_mode():
        return mmaemu.scaled_mm(call.a, call.b, call.scale_a, call.scale_b, profile=profile, **call.kwargs())


def cpu_h100_bound(call: ScaledMmCall, h100: torch.Tensor, cpu: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Element-wise bound on ``|h100 - cpu|`` (the module docstring derives it)."""
    cpu = call.out if cpu is None else cpu
    k = call.a.shape[1]
    nb = math.ceil(k / 32)
    s = call.a.double().abs() @ call.b.double().abs()
    alpha = (call.scale_a.double() * call.scale_b.double()).abs()
    u = UNIT_ROUNDOFF[call.out_dtype]
    accumulate = alpha * s * (nb * 33 * 2.0 ** -13 + (k + nb + 4) * 2.0 ** -24)
    rounding = 2 * u / (1 - u) * torch.maximum(h100.double().abs(), cpu.double().abs())
    return accumulate + rounding
