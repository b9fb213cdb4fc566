#!/usr/bin/env python
"""Where FP8 pays: the modelled training step of a config on an H100 or H200, bf16 against FP8.

    python tools/fp8_plan.py --preset sd3_light --resolution 1024 --micro-batch-size 4 --gpu h200
    python tools/fp8_plan.py --preset sd3_light --hidden-size 2432 --num-attention-heads 38 --json

Prints the step in bf16 and in FP8 (``--fp8-gemms rule``: FP8 for the block GEMMs where its GEMMs
plus casts beat bf16; ``all``: every block GEMM, as the torchao backend runs today), the speedup,
every GEMM's time both ways, the theoretical memory of one rank with bf16 parameters (the
training log's, ``megatron_sd3.memory.plan_memory``), and the width, micro batch and resolution at
which the model puts FP8 at 1.1x and 1.3x. ``--json``: one line with ``bf16_ms``, ``fp8_ms``,
``speedup``, ``gemms``, ``memory_GiB`` and ``thresholds``. The model and its calibration (one H200 measurement): megatron_sd3/step_time.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = (1.1, 1.3)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd3_light")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-attention-heads", type=int, default=None)
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents: /8)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--text-recon-gamma", type=float, default=0.0)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--gpu", default="h200", help="h100 or h200")
    p.add_argument("--fp8-gemms", default="rule", choices=["rule", "all"],
                   help="rule: FP8 where the model says it pays; all: every joint-block GEMM")
    p.add_argument("--json", action="store_true", help="one JSON line")
    return p


def planned_memory(a, overrides: dict, hw) -> dict:
    """Megatron-LM's theoretical memory of the first pipeline rank with bf16 parameters, GiB."""
    import torch

    from megatron_sd3.config import make_config
    from megatron_sd3.memory import GiB, plan_memory

    cfg = make_config(a.preset, parallel=dict(bf16=True, params_dtype=torch.bfloat16,
                                              tensor_model_parallel_size=a.tensor_model_parallel_size),
                      **overrides)
    row = plan_memory(cfg, latent_hw=hw, micro_batch=a.micro_batch_size)[0]
    return {k: round(row[k] / GiB, 2) for k in ("weights", "grads", "optimizer", "activations", "total")}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from megatron_sd3 import step_time
    from megatron_sd3.config import ConfigError, make_config

    prog = "fp8_plan.py"
    if a.gpu not in step_time.GPUS:
        print(f"{prog}: error: --gpu {a.gpu!r} unknown; use one of {', '.join(step_time.GPUS)}", file=sys.stderr)
        return 2
    if a.resolution <= 0 or a.resolution % 16:
        print(f"{prog}: error: --resolution {a.resolution} must be a positive multiple of 16", file=sys.stderr)
        return 2
    if a.micro_batch_size < 1 or a.tensor_model_parallel_size < 1 or a.context_parallel_size < 1:
        print(f"{prog}: error: --micro-batch-size and the parallel sizes must be >= 1", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in dict(num_layers=a.num_layers, hidden_size=a.hidden_size,
                                       num_attention_heads=a.num_attention_heads,
                                       text_recon_gamma=a.text_recon_gamma or None).items() if v is not None}
    if a.hidden_size and not a.num_attention_heads:
        overrides["num_attention_heads"] = a.hidden_size // 64  # SD3's head size
    try:
        cfg = make_config(a.preset, **overrides)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    hw = (a.resolution // 8, a.resolution // 8)
    par = dict(gpu=a.gpu, tp=a.tensor_model_parallel_size, cp=a.context_parallel_size, fp8=a.fp8_gemms)
    out = step_time.plan(cfg, hw, a.micro_batch_size, **par)
    out["memory_GiB"] = planned_memory(a, overrides, hw)

    def at(**change):
        def make(v):
            fields = dict(overrides)
            res, mb = a.resolution, a.micro_batch_size
            if "hidden" in change:
                fields.update(hidden_size=v, num_attention_heads=v // 64)
            elif "mb" in change:
                mb = v
            else:
                res = v
            return make_config(a.preset, **fields), (res // 8, res // 8), mb
        return make

    widths = list(range(1536, 16384 + 1, 128))
    out["thresholds"] = {
        f"{t}x": dict(hidden_size=step_time.thresholds(at(hidden=True), widths, t, **par),
                      micro_batch_size=step_time.thresholds(at(mb=True), [1, 2, 4, 8, 16, 32, 64], t, **par),
                      resolution=step_time.thresholds(at(res=True), list(range(256, 4096 + 1, 256)), t, **par))
        for t in TARGETS}
    if a.json:
        print(json.dumps(out))
        return 0
    c = out["calibration"]
    print(f"{a.preset} (hidden {cfg.hidden_size}, {cfg.num_layers} blocks), {a.resolution} px, micro batch "
          f"{a.micro_batch_size}, TP {par['tp']}, CP {par['cp']}, on {a.gpu.upper()} (modelled; calibrated on one "
          f"H200 measurement: GEMMs at {c['gemm_eff_bf16']:.0%} of the bf16 peak, FP8 GEMMs at "
          f"{c['gemm_eff_fp8']:.0%} of the FP8 peak, attention at {c['attn_eff']:.0%}, casts at "
          f"{c['mem_eff']:.0%} of the memory bandwidth)")
    print(f"  bf16 step  {out['bf16_ms']:8.1f} ms  (attention {out['attention_ms']:.1f}, GEMMs "
          f"{out['gemm_bf16_ms']:.1f}, other {out['other_ms']:.1f})")
    print(f"  FP8 step   {out['fp8_ms']:8.1f} ms  (GEMMs with casts {out['gemm_fp8_ms']:.1f}; --fp8-gemms "
          f"{a.fp8_gemms})   speedup {out['speedup']:.3f}x")
    print(f"  {'GEMM':<18} {'M':>7} {'K':>6} {'N':>6} {'x':>3} {'bf16 ms':>8} {'FP8+cast':>8}  FP8")
    for g in out["gemms"]:
        f8 = "-" if g["fp8_ms"] is None else f"{g['fp8_ms']:.3f}"
        print(f"  {g['name']:<18} {g['m']:>7} {g['k']:>6} {g['n']:>6} {g['count']:>3} {g['bf16_ms']:>8.3f} "
              f"{f8:>8}  {'yes' if g['fp8'] else 'no'}")
    m = out["memory_GiB"]
    print(f"  memory (one rank, bf16 params, theoretical): {m['total']:.2f} GiB = weights {m['weights']:.2f}"
          f" + grads {m['grads']:.2f} + optimizer {m['optimizer']:.2f} + activations {m['activations']:.2f}")
    for t, where in out["thresholds"].items():
        said = ", ".join(f"{k.replace('_', ' ')} {v if v is not None else 'none in range'}" for k, v in where.items())
        print(f"  FP8 reaches {t} (one thing changed at a time): {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
