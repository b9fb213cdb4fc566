#!/usr/bin/env python
"""Plan the memory of a run without building a model (Megatron-LM's theoretical memory report).

    python tools/memory_plan.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --data-parallel-size 8 \\
        --bf16 --use-distributed-optimizer --recompute selective --gpu-memory 80

Per pipeline rank: parameters, weights, gradients, optimizer state, activations per microbatch
x the microbatches in flight under 1F1B (interleaved with --num-virtual-stages-per-pipeline-rank),
and the total; then the largest micro batch that fits in --gpu-memory GiB. ``--recompute`` is
``none``, ``selective`` or ``full`` (full: ``--recompute-method``/``--recompute-num-layers``,
default uniform, 1). The activation figures are the closed forms of ``megatron_sd3.memory``,
checked against autograd's saved tensors (tests/tools/test_memory_plan.py, tools/bench_memory.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd3_light")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents: /8)")
    p.add_argument("--text-recon-gamma", type=float, default=0.0)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="microbatches per iteration and DP rank (default: the pipeline size)")
    p.add_argument("--tensor-model-parallel-size", "--tensor", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pipeline", type=int, default=1)
    p.add_argument("--context-parallel-size", "--context-parallel", type=int, default=1,
                   help="ranks each sample's image tokens are split over (Ulysses)")
    p.add_argument("--data-parallel-size", "--data-parallel", type=int, default=1)
    p.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    p.add_argument("--pipeline-layers", default=None, help="blocks per stage, e.g. 8,7")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 weights/activations (fp32 otherwise)")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    from megatron_sd3.config import ConfigError, make_config
    from megatron_sd3.memory import format_report, largest_micro_batch, plan_memory
    from megatron_sd3.training.parallel_layout import (LayoutError, check_layout, pipeline_config_fields,
                                                          stage_layers)

    prog = "memory_plan.py"
    try:
        if a.resolution <= 0 or a.resolution % 8:
            raise ConfigError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {a.resolution}")
        for flag in ("micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "data_parallel_size", "recompute_num_layers"):
            if getattr(a, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
        if a.gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory must be > 0 GiB, got {a.gpu_memory}")
        over = {"text_recon_gamma": a.text_recon_gamma}
        if a.num_layers:
            over["num_layers"] = a.num_layers
        from megatron_sd3.config import model_fields

        n_layers = model_fields(a.preset, **over)["num_layers"]
        pp = a.pipeline_model_parallel_size
        given = [int(v) for v in a.pipeline_layers.split(",")] if a.pipeline_layers else None
        blocks = stage_layers(n_layers, pp, given)
        vpp = a.num_virtual_stages_per_pipeline_rank
        if vpp and (vpp < 2 or pp < 2 or len(set(blocks)) > 1 or blocks[0] % vpp):
            raise LayoutError(f"--num-virtual-stages-per-pipeline-rank {vpp} needs PP >= 2 and the same "
                              f"number of blocks on every stage, divisible by it; got {blocks}")
        parallel = dict(tensor_model_parallel_size=a.tensor_model_parallel_size, pipeline_model_parallel_size=pp,
                        context_parallel_size=a.context_parallel_size,
                        **pipeline_config_fields(n_layers, pp, given))
        if vpp:
            parallel["virtual_pipeline_model_parallel_size"] = vpp
        if a.bf16:
            parallel.update(bf16=True, params_dtype=torch.bfloat16)
        if a.recompute == "full":
            parallel.update(recompute_granularity="full", recompute_method=a.recompute_method,
                            recompute_num_layers=a.recompute_num_layers)
        elif a.recompute == "selective":
            parallel["recompute_granularity"] = "selective"
        cfg = make_config(a.preset, parallel=parallel, **over)
        tp, cp, dp, mb = (a.tensor_model_parallel_size, a.context_parallel_size, a.data_parallel_size,
                          a.micro_batch_size)
        check_layout(tp * pp * cp * dp, tp, pp, n_layers, cfg.num_attention_heads, cfg.hidden_size,
                     global_batch=mb * dp, micro_batch=mb, cp=cp)  # pretrain_sd3.py's rules
        from megatron_sd3.models import context_parallel

        side = a.resolution // 8
        context_parallel.check_image_tokens(cfg, cfg.num_image_tokens(side, side))
    except (ConfigError, LayoutError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    kw = dict(latent_hw=(side, side), data_parallel=a.data_parallel_size, num_microbatches=a.num_microbatches,
              use_distributed_optimizer=a.use_distributed_optimizer, stage_blocks=blocks)
    rows = plan_memory(cfg, micro_batch=a.micro_batch_size, **kw)
    rec = a.recompute + (f" ({a.recompute_method}, {a.recompute_num_layers})" if a.recompute == "full" else "")
    print(format_report(rows, title=f"{a.preset} {a.resolution} px, micro batch {a.micro_batch_size}, "
                                    f"TP {a.tensor_model_parallel_size} PP {pp} CP {a.context_parallel_size} "
                                    f"DP {a.data_parallel_size}, "
                                    f"recompute {rec}", gpu_memory_gib=a.gpu_memory))
    best = largest_micro_batch(cfg, a.gpu_memory, **kw)
    print(f" largest micro batch that fits in {a.gpu_memory:g} GiB: {best}"
          + ("" if best else " (none: raise TP/PP, recompute, or use the distributed optimizer)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
