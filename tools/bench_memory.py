#!/usr/bin/env python
"""Activation memory of the joint blocks with each recompute mode: measured and planned.

    python tools/bench_memory.py                      # sd3_light, 256 and 1024 px (~10 min, ~12 GB)
    python tools/bench_memory.py --preset tiny --resolutions 64 128 --timing-resolution 64

Measured: the bytes autograd saves for backward during one forward (saved-tensor hooks,
parameters excluded, distinct storages, after selective recomputation has freed what it drops;
``megatron_sd3.memory.saved_bytes_by_part``), per block and microbatch, fp32 on this CPU, for
``none``, ``selective`` and ``full`` (uniform, 1 block). The model measured holds one block of
each kind the preset has (sd3_light: a dual-attention block as blocks 1-13, a plain block with a
text output as block 14, the last block, whose text output gamma = 0 skips); the whole model
is embeddings + head + each kind times its count. Planned: ``megatron_sd3.memory``'s closed
form for the same shapes, side by side, with the ratio. Step time (forward + backward, one
dual-attention block, --timing-resolution) of each mode relative to none, measured round-robin
in one process (median of per-round ratios).

Goals: whole model full <= 25% of none; selective <= 60% of none at <= 10% extra step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
MiB = 2**20


def _kinds(cfg):
    """(dual, text_output) of each block of the preset -> count, in block order."""
    kinds = {}
    for n in range(1, cfg.num_layers + 1):
        key = ((n - 1) in cfg.dual_attention_layers, cfg.block_keeps_text(n) and (n < cfg.num_layers or cfg.text_recon))
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def _probe_fields(kinds):
    """Model fields of a small model with one block of each kind, in the kinds' order."""
    order = sorted(kinds, key=lambda k: (not k[0], not k[1]))  # dual first, the text-less last
    dual = tuple(i for i, k in enumerate(order) if k[0])
    if any(not k[1] for k in order[:-1]):
        raise SystemExit("bench_memory.py: error: only the last block may skip its text output")
    return order, dict(num_layers=len(order), dual_attention_layers=dual)


def measure(preset, overrides, px, micro_batch):
    import torch

    from megatron_sd3.config import make_config
    from megatron_sd3.memory import measure_saved_bytes, planned_saved_bytes
    from megatron_sd3.models.sd3_model import SD3Model

    side = px // 8
    full_cfg = make_config(preset, **overrides)
    kinds = _kinds(full_cfg)
    order, probe = _probe_fields(kinds)
    rows = {}
    for mode, rec in MODES.items():
        cfg = make_config(preset, parallel=rec, **{**overrides, **probe})
        with torch.random.fork_rng(devices=[]):
            model = SD3Model(cfg)
        got = measure_saved_bytes(model, (side, side), micro_batch)
        del model
        gc.collect()  # one sd3_light probe model at a time (a few GB each on CPU)
        plan = planned_saved_bytes(cfg, (side, side), micro_batch)
        blocks = [{"kind": ("dual" if k[0] else "plain") + ("" if k[1] else ", no text out"),
                   "count": kinds[k], "measured": got.get(i + 1, 0), "planned": plan[i + 1]}
                  for i, k in enumerate(order)]
        whole_m = got.get("embeddings", 0) + got.get("head", 0) + sum(b["count"] * b["measured"] for b in blocks)
        whole_p = plan["embeddings"] + plan["head"] + sum(b["count"] * b["planned"] for b in blocks)
        rows[mode] = {"blocks": blocks, "whole_measured": whole_m, "whole_planned": whole_p,
                      "per_block_measured": whole_m / full_cfg.num_layers}
    return rows


def time_modes(preset, overrides, px, micro_batch, rounds):
    import torch

    from megatron_sd3.config import make_config
    from megatron_sd3.memory import sample_inputs
    from megatron_sd3.models.sd3_model import SD3Model

    side = px // 8
    models = {}
    for mode, rec in MODES.items():
        cfg = make_config(preset, parallel=rec, **{**overrides, "num_layers": 1, "dual_attention_layers": (0,)})
        with torch.random.fork_rng(devices=[]):
            models[mode] = SD3Model(cfg)
    inputs = sample_inputs(models["none"].config, (side, side), micro_batch)
    times = {m: [] for m in models}
    names = list(models)
    for r in range(rounds + 1):  # round 0 warms up
        for m in names[r % len(names):] + names[:r % len(names)]:
            model = models[m]
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(**inputs).square().mean().backward()
            if r:
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(a / b for a, b in zip(times[m], times["none"])) for m in names}, \
        {m: statistics.median(times[m]) for m in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd3_light")
    p.add_argument("--resolutions", type=int, nargs="*", default=[256, 1024],
                   help="image sides in pixels to measure (none: timing only)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--timing-resolution", type=int, default=256, help="0: no timing")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: steadier ratios on a small shared box; 0: all cores)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    bad = [r for r in a.resolutions + ([a.timing_resolution] if a.timing_resolution else []) if r <= 0 or r % 16]
    if bad or a.micro_batch_size < 1 or a.rounds < 1:
        print(f"bench_memory.py: error: resolutions must be positive multiples of 16 (got {bad}), "
              f"--micro-batch-size and --rounds >= 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    from megatron_sd3.convert import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()
    result = {"preset": a.preset, "micro_batch": a.micro_batch_size, "resolutions": {}}
    print(f"saved for backward, fp32, micro batch {a.micro_batch_size}, {a.preset} "
          f"(MiB; measured by saved-tensor hooks | planned by megatron_sd3.memory)")
    print(f"{'px':>5} {'mode':>9} | {'block kind':>18} {'count':>5} {'measured':>10} {'planned':>10} {'ratio':>6}"
          f" | {'whole model':>11} {'planned':>9} {'of none':>7}")
    for px in a.resolutions:
        rows = measure(a.preset, {}, px, a.micro_batch_size)
        result["resolutions"][px] = rows
        none = rows["none"]["whole_measured"]
        for mode, row in rows.items():
            for i, b in enumerate(row["blocks"]):
                tail = (f" | {row['whole_measured'] / MiB:11.1f} {row['whole_planned'] / MiB:9.1f} "
                        f"{row['whole_measured'] / none:7.1%}") if i == 0 else " |"
                print(f"{px:5d} {mode:>9} | {b['kind']:>18} {b['count']:5d} {b['measured'] / MiB:10.2f} "
                      f"{b['planned'] / MiB:10.2f} {b['planned'] / max(b['measured'], 1):6.3f}" + tail)
        row_sel, row_full = rows["selective"], rows["full"]
        result["resolutions"][px]["fraction_of_none"] = {
            "selective": row_sel["whole_measured"] / none, "full": row_full["whole_measured"] / none}
    if a.timing_resolution:
        ratio, med = time_modes(a.preset, {}, a.timing_resolution, a.micro_batch_size, a.rounds)
        result["step_time"] = {"resolution": a.timing_resolution, "ratio_to_none": ratio, "median_s": med}
        print(f"step time, one dual-attention block, {a.timing_resolution} px (fwd + bwd, median of "
              f"{a.rounds} rounds): " + ", ".join(f"{m} {med[m]:.3f} s ({ratio[m]:.3f}x)" for m in ratio))
    for px, rows in result["resolutions"].items():
        f = rows["fraction_of_none"]
        print(f"goals at {px} px: full {f['full']:.1%} of none (<= 25%: {'MET' if f['full'] <= 0.25 else 'MISSED'}); "
              f"selective {f['selective']:.1%} (<= 60%: {'MET' if f['selective'] <= 0.6 else 'MISSED'})")
    if a.timing_resolution:
        extra = result["step_time"]["ratio_to_none"]["selective"] - 1
        print(f"selective extra step time {extra:+.1%} (<= 10%: {'MET' if extra <= 0.10 else 'MISSED'})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
