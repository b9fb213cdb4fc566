"""GPU check of the torchao FP8 backend (megatron_sd3/backends/torchao.py).

Run on a CUDA machine with megatron-core and torchao importable (tools/gpu_check.sh step 8):
    python tools/fp8_gpu_check.py [--out DIR] [--no-compile] [--gemm-ceiling]
It prints and writes fp8_gpu.json:
  * correctness at SD3 shapes (hidden 1536, MLP 6144, 336 text tokens): FP8 (bf16 params) and
    plain bf16 against an fp32 reference, and the number of torch._scaled_mm calls;
  * what happens with 333 tokens (why the text stream is padded to a multiple of 16);
  * throughput of an MMDiT MLP (column -> GELU -> row, forward + backward) at 1024 px
    (4096 image tokens x micro-batch 4), bf16 vs FP8, eager and torch.compile'd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def init():
    from megatron_sd3.convert import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()  # nccl on CUDA, one process, TP = PP = 1


def build_pair(h, f, dtype, seed=0):
    """The torchao column -> row pair at hidden h, MLP width f (weights and biases ~ N(0, 0.02))."""
    from megatron_sd3.testing.helpers import build_fp8_pair

    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(*shape, generator=g) * 0.02
               for name, shape in (("w1", (f, h)), ("b1", (f,)), ("w2", (h, f)), ("b2", (h,)))}
    return build_fp8_pair(weights, dtype, device="cuda")


def fwd(col, row, x):
    hdn, _ = col(x)
    y, _ = row(torch.nn.functional.gelu(hdn, approximate="tanh"))
    return y


def correctness(res):
    from megatron_sd3.backends.torchao import fp8_context
    from megatron_sd3.testing.helpers import rel

    h, f = 1536, 6144
    col, row = build_pair(h, f, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(336, 2, h, device="cuda", generator=g)
    gy = torch.randn(336, 2, h, device="cuda", generator=g) * 1e-3
    # fp32 reference with the same (bf16-rounded) weights
    w1, b1, w2, b2 = (p.detach().float().requires_grad_(True)
                      for p in (col.weight, col.bias, row.weight, row.bias))
    xr = x.clone().requires_grad_(True)
    yr = torch.nn.functional.gelu(xr @ w1.t() + b1, approximate="tanh") @ w2.t() + b2
    yr.backward(gy)
    ref = dict(y=yr, dx=xr.grad, dw1=w1.grad, dw2=w2.grad)

    calls = []
    orig = torch._scaled_mm

    def counting(a, b, *args, **kw):
        calls.append((str(a.dtype), str(b.dtype), tuple(a.shape), tuple(b.shape)))
        return orig(a, b, *args, **kw)

    for name in ("bf16", "hybrid", "e4m3"):
        xi = x.to(torch.bfloat16).clone().requires_grad_(True)
        for p in (col.weight, col.bias, row.weight, row.bias):
            p.grad = None
        calls.clear()
        torch._scaled_mm = counting
        try:
            ctx = fp8_context(False) if name == "bf16" else fp8_context(True, name)
            with ctx:
                y = fwd(col, row, xi)
                y.backward(gy.to(torch.bfloat16))
        finally:
            torch._scaled_mm = orig
        got = dict(y=y, dx=xi.grad, dw1=col.weight.grad, dw2=row.weight.grad)
        res[f"rel_err_vs_fp32_{name}"] = {k: round(rel(got[k], ref[k]), 5) for k in ref}
        res[f"scaled_mm_calls_{name}"] = len(calls)
        log(name, res[f"rel_err_vs_fp32_{name}"], "scaled_mm calls:", len(calls))

    # 333 tokens (unpadded SD3 text stream)
    x333 = torch.randn(333, 1, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        with fp8_context(True, "hybrid"):
            y = fwd(col, row, x333)
            y.float().sum().backward()
        torch.cuda.synchronize()
        res["tokens_333"] = "ran"
    except Exception as e:  # noqa: BLE001 - we record what the GPU says
        res["tokens_333"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    log("333 tokens:", res["tokens_333"])


def bench(res, use_compile):
    from megatron_sd3.flops import peak_tflops
    from megatron_sd3.backends.torchao import fp8_context

    h, f, tokens, mb = 1536, 6144, 4096, 4
    col, row = build_pair(h, f, torch.bfloat16)
    x = torch.randn(tokens, mb, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x) * 1e-3
    flops = 3 * 2 * tokens * mb * 2 * h * f  # fwd + bwd of two GEMMs
    name = torch.cuda.get_device_name()
    modes = [("bf16", False, False), ("fp8_hybrid", True, False)]
    if use_compile:
        modes += [("bf16_compiled", False, True), ("fp8_hybrid_compiled", True, True)]
    out = {}
    for mode, fp8, comp in modes:
        if time.time() - T0 > 360:
            log("skipping", mode, "(time)")
            continue
        try:
            with fp8_context(fp8, "hybrid"):
                fn = (lambda x: fwd(col, row, x))
                if comp:
                    torch._dynamo.reset()
                    fn = torch.compile(fn)
                t = time.time()
                for _ in range(3):
                    fn(x).backward(gy)
                torch.cuda.synchronize()
                warm = time.time() - t
                s, e = torch.cuda.Event(True), torch.cuda.Event(True)
                n = 20
                s.record()
                for _ in range(n):
                    fn(x).backward(gy)
                e.record()
                torch.cuda.synchronize()
                ms = s.elapsed_time(e) / n
            tf = flops / ms / 1e9
            out[mode] = dict(ms=round(ms, 3), tflops=round(tf, 1), warmup_s=round(warm, 1),
                             mfu_bf16_peak=round(tf / peak_tflops(name, "bf16"), 3)
                             if peak_tflops(name, "bf16") else None)
            log(mode, out[mode])
        except Exception as ex:  # noqa: BLE001
            out[mode] = f"{type(ex).__name__}: {str(ex)[:300]}"
            log(mode, "FAILED", out[mode])
    for a, b in (("bf16", "fp8_hybrid"), ("bf16_compiled", "fp8_hybrid_compiled")):
        if isinstance(out.get(a), dict) and isinstance(out.get(b), dict):
            out[f"speedup_{b}"] = round(out[a]["ms"] / out[b]["ms"], 3)
    res["mlp_bench_1024px_mb4"] = out


def gemm_ceiling(res):
    """Raw GEMM rates at the MLP's shapes: bf16 mm vs torch._scaled_mm (e4m3, tensorwise)."""
    out = {}
    for m, k, n in ((16384, 1536, 6144), (16384, 6144, 1536)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device="cuda")
        for name, fn in (
            ("bf16", lambda: a @ b.t()),
            ("fp8", lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                             out_dtype=torch.bfloat16, use_fast_accum=True)),
        ):
            for _ in range(3):
                fn()
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            s.record()
            for _ in range(20):
                fn()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e) / 20
            out[f"{name}_{m}x{k}x{n}_tflops"] = round(2 * m * k * n / ms / 1e9, 1)
    res["gemm_ceiling"] = out
    log(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--gemm-ceiling", action="store_true")
    args = ap.parse_args()
    import torchao
    import megatron.core

    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               torchao=torchao.__version__, megatron_core=megatron.core.__version__)
    log(res)
    init()
    steps = [correctness, lambda r: bench(r, not args.no_compile)]
    if args.gemm_ceiling:
        steps = [gemm_ceiling] + steps
    for step in steps:
        try:
            step(res)
        except Exception as ex:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res.setdefault("errors", []).append(f"{type(ex).__name__}: {ex}"[:500])
    with open(os.path.join(args.out, "fp8_gpu.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
