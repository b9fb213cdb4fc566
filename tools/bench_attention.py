#!/usr/bin/env python
"""Attention kernels at the MMDiT's shapes: which torch SDPA backend to train with.

    python tools/bench_attention.py                      # CPU: tiny shapes (make bench)
    python tools/bench_attention.py --json att.json      # GPU: sd3_light at 1024 px, micro batch 4

For each backend that can run the call -- ``flash`` (FlashAttention-2), ``fused`` (cuDNN),
``efficient`` (memory-efficient), ``unfused`` (math; skipped where its [s, s] scores would
not fit) -- forward and forward+backward time of one call with q, k, v ``[b, heads, s, d]`` in the
training dtype (bf16 on GPU, fp32 on CPU), for:

* ``joint``: one joint attention over [image | text] (sd3_light 1024 px: 4096 + 333 tokens),
* ``joint+pad-mask``: the same with the text padded to a multiple of 16 and the pads masked by a
  boolean key mask -- what FP8 text padding costs if the pads were masked instead of left out of
  the sequence (the model leaves them out; this row shows why),
* ``image``: MMDiT-X's image-only second attention (4096 tokens).

TFLOP/s counts 4*b*heads*s_q*s_k*d per forward and 2.5x that for the backward (FlashAttention's
convention). ``--attention-backend`` of ``pretrain_sd3.py`` / ``bench_throughput.py`` picks one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "fused": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "unfused": SDPBackend.MATH}


def timed(fn, iters: int, cuda: bool) -> float:
    """Milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def measure(backend: str, b: int, heads: int, s: int, d: int, mask_pad: int, dtype, dev, iters: int) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, d, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    mask = None
    if mask_pad:
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=dev)
        mask[..., s - mask_pad:] = False  # True = attend (torch's convention)
    grad = torch.randn(b, heads, s, d, device=dev, dtype=dtype, generator=g)

    def fwd():
        with torch.no_grad(), sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fwd_bwd():
        with sdpa_kernel([BACKENDS[backend]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    fl = 4 * b * heads * s * s * d
    f_ms = timed(fwd, iters, dev.type == "cuda")
    fb_ms = timed(fwd_bwd, iters, dev.type == "cuda")
    return dict(fwd_ms=round(f_ms, 3), fwd_bwd_ms=round(fb_ms, 3),
                fwd_tflops=float(f"{fl / f_ms / 1e9:.4g}"), fwd_bwd_tflops=float(f"{3.5 * fl / fb_ms / 1e9:.4g}"))


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4 if cuda else 2)
    ap.add_argument("--heads", type=int, default=24 if cuda else 4)
    ap.add_argument("--head-dim", type=int, default=64 if cuda else 16)
    ap.add_argument("--img-tokens", type=int, default=4096 if cuda else 64, help="1024 px: 4096")
    ap.add_argument("--text-tokens", type=int, default=333 if cuda else 13)
    ap.add_argument("--iters", type=int, default=10 if cuda else 3)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    pad = -args.text_tokens % 16
    cases = [("joint", args.img_tokens + args.text_tokens, 0),
             ("joint+pad-mask", args.img_tokens + args.text_tokens + pad, pad),
             ("image", args.img_tokens, 0)]
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    out = dict(device=device_name, torch=torch.__version__, dtype=str(dtype).replace("torch.", ""),
               batch=args.batch, heads=args.heads, head_dim=args.head_dim, rows=[])
    print(f"SDPA at MMDiT shapes on {device_name} ({out['dtype']}, batch {args.batch}, {args.heads} heads "
          f"x {args.head_dim}); fwd+bwd TFLOP/s = 3.5 x 4*b*h*s^2*d")
    print(f"{'case':16s} {'tokens':>6s} {'backend':10s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    for case, s, mask_pad in cases:
        for be in args.backends:
            if be == "unfused" and args.batch * args.heads * s * s * 4 > 8 * 2**30:
                continue  # the [s, s] score matrix alone would be > 8 GiB
            row = dict(case=case, tokens=s, backend=be)
            try:
                row.update(measure(be, args.batch, args.heads, s, args.head_dim, mask_pad, dtype, dev, args.iters))
            except RuntimeError as e:  # this backend cannot run this call (e.g. no mask support)
                row["error"] = str(e).splitlines()[0][:160]
                if cuda:
                    torch.cuda.empty_cache()
            out["rows"].append(row)
            if "error" in row:
                print(f"{case:16s} {s:6d} {be:10s} cannot run: {row['error'][:70]}")
            else:
                print(f"{case:16s} {s:6d} {be:10s} {row['fwd_ms']:8.2f} {row['fwd_bwd_ms']:11.2f} "
                      f"{row['fwd_bwd_tflops']:8.3g}")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
