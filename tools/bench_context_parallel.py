#!/usr/bin/env python
"""Context parallelism: saved activations per rank and step time, measured.

    python tools/bench_context_parallel.py            # sd3_light, 1 block, 2048 px, CP 1/2/4; tiny step time
    python tools/bench_context_parallel.py --preset tiny --resolution 128 --context-parallel 1 2 4 --no-timing

Memory: for each context-parallel size, that many ranks (spawned here, gloo on CPU, nccl on GPUs)
build the model (``--num-layers`` blocks, default 1) and run one forward of micro batch
``--micro-batch-size`` under autograd's saved-tensor hooks (``megatron_sd3.memory.saved_bytes_by_part``,
what the memory tests use): the bytes rank 0 keeps for backward, by part, next to the planner's
figure (``megatron_sd3.memory``, what ``tools/memory_plan.py`` prints) and the ratio to CP = 1.

Step time: 2 processes, ``--timing-preset`` (tiny) at ``--timing-latent`` latents, the same
global batch as CP = 2 (DP = 1) and as CP = 1 (DP = 2), alternated round by round in one run
(each round builds the layout afresh, warms up one iteration, then times ``--steps``); the
median of the per-round ratios CP=2 / CP=1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _memory_rank(rank, world, port, preset, overrides, latent_hw, micro_batch, out):
    _rank_env(rank, world, port)
    import torch

    torch.set_num_threads(1)
    from megatron_sd3.config import make_config
    from megatron_sd3.distributed import destroy_distributed, initialize_distributed
    from megatron_sd3.memory import measure_saved_bytes, planned_saved_bytes
    from megatron_sd3.models.sd3_model import SD3Model

    initialize_distributed(1, 1, seed=1234, cp=world, watch_parent=False)
    cfg = make_config(preset, parallel=dict(context_parallel_size=world), **overrides)
    model = SD3Model(cfg)
    got = measure_saved_bytes(model, latent_hw, micro_batch)
    plan = planned_saved_bytes(cfg, latent_hw, micro_batch)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"measured": {str(k): v for k, v in got.items()},
                       "planned": {str(k): v for k, v in plan.items()}}, fh)
    destroy_distributed()


def _free_port() -> int:
    from megatron_sd3.distributed import free_port

    return free_port()


def _spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, start_method="spawn", join=True)


def measure_memory(preset: str, overrides: dict, latent_hw, micro_batch: int, cps) -> dict:
    """``{cp: {"measured": {part: bytes}, "planned": {part: bytes}}}`` of rank 0 for each CP size."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cp in cps:
            path = os.path.join(tmp, f"cp{cp}.json")
            _spawn(_memory_rank, cp, preset, overrides, tuple(latent_hw), micro_batch, path)
            with open(path) as fh:
                out[cp] = json.load(fh)
    return out


def _timing_rank(rank, world, port, preset, latent_hw, rounds, steps, out):
    _rank_env(rank, world, port)
    import torch
    from megatron.core import parallel_state as ps

    torch.set_num_threads(1)
    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    gbs, mbs = 8, 2
    times = {1: [], 2: []}
    for r in range(rounds):
        for cp in ((1, 2) if r % 2 == 0 else (2, 1)):
            initialize_distributed(1, 1, seed=1234, cp=cp, watch_parent=False)
            cfg = make_config(preset, parallel=dict(context_parallel_size=cp))
            built = build_training(cfg, optimizer=dict(lr=1e-4))
            step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=gbs, micro_batch_size=mbs, seed=1)
            ds = MockDataset(10_000, latent_size=tuple(latent_hw), in_channels=cfg.in_channels,
                             text_len=cfg.text_seq_len, text_dim=cfg.joint_attention_dim,
                             pooled_dim=cfg.pooled_projection_dim, seed=5)
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            per = gbs // dp

            def batches(it):
                return [{k: torch.stack([ds[it * gbs + dp_rank * per + m * mbs + j][k] for j in range(mbs)])
                         for k in ds[0]} for m in range(per // mbs)]

            data = [batches(it) for it in range(steps + 1)]
            step(data[0], 0)  # warm-up
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for it in range(1, steps + 1):
                step(data[it], it * gbs)
            torch.distributed.barrier()
            times[cp].append((time.perf_counter() - t0) / steps)
            built.free()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(times, fh)


def measure_step_time(preset: str, latent_hw, rounds: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        _spawn(_timing_rank, 2, preset, tuple(latent_hw), rounds, steps, path)
        with open(path) as fh:
            times = {int(k): v for k, v in json.load(fh).items()}
    ratios = [a / b for a, b in zip(times[2], times[1])]
    return {"seconds_per_iteration": {cp: statistics.median(v) for cp, v in times.items()},
            "ratio_cp2_to_cp1": statistics.median(ratios), "rounds": rounds, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd3_light")
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--resolution", type=int, default=2048, help="image side in pixels (latents: /8); 0: no memory")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--context-parallel", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--timing-preset", default="tiny")
    p.add_argument("--timing-latent", default="32x32", help="HxW latents of the step-time runs")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    try:
        th, tw = (int(v) for v in a.timing_latent.lower().split("x"))
    except ValueError:
        print(f"bench_context_parallel.py: error: --timing-latent must look like 32x32, got {a.timing_latent!r}",
              file=sys.stderr)
        return 2
    if a.resolution < 0 or a.resolution % 16 or min(a.context_parallel) < 1 or a.rounds < 1 or a.steps < 1:
        print("bench_context_parallel.py: error: --resolution must be a multiple of 16, --context-parallel, "
              "--rounds and --steps >= 1", file=sys.stderr)
        return 2
    result = {}
    if a.resolution:
        side = a.resolution // 8
        mem = measure_memory(a.preset, {"num_layers": a.num_layers}, (side, side), a.micro_batch_size,
                             a.context_parallel)
        base = None
        print(f"saved for backward per rank, {a.preset}, {a.num_layers} block(s), {a.resolution} px "
              f"({side}x{side} latents), micro batch {a.micro_batch_size}, fp32 (MiB)")
        print(f"   CP |  block 1 measured |  planned | planned/measured |  whole measured |  planned | vs CP={a.context_parallel[0]}")
        rows = {}
        for cp, r in mem.items():
            m, pl = r["measured"], r["planned"]
            whole_m, whole_p = sum(m.values()), sum(pl.values())
            base = base or m.get("1", 0.0)
            rows[cp] = {"block1_measured": m.get("1", 0.0), "block1_planned": pl["1"], "whole_measured": whole_m,
                        "whole_planned": whole_p, "block1_vs_cp1": m.get("1", 0.0) / base,
                        "measured": m, "planned": pl}
            print(f" {cp:4d} | {m.get('1', 0) / MiB:17.1f} | {pl['1'] / MiB:8.1f} | {pl['1'] / m.get('1', 1):16.3f} |"
                  f" {whole_m / MiB:15.1f} | {whole_p / MiB:8.1f} | {m.get('1', 0) / base:7.3f}")
        result["memory"] = {"preset": a.preset, "resolution": a.resolution, "micro_batch": a.micro_batch_size,
                            "num_layers": a.num_layers, "per_cp": rows}
    if not a.no_timing:
        t = measure_step_time(a.timing_preset, (th, tw), a.rounds, a.steps)
        s = t["seconds_per_iteration"]
        print(f"step time, 2 processes, {a.timing_preset} preset, {th}x{tw} latents, global batch 8: "
              f"CP=2 {s[2] * 1e3:.1f} ms, CP=1 (DP=2) {s[1] * 1e3:.1f} ms; CP=2 / CP=1 = "
              f"{t['ratio_cp2_to_cp1']:.3f} (median of {a.rounds} rounds)")
        result["step_time"] = t
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
