#!/usr/bin/env python
"""Pretrain sd3_light (SD3's MMDiT, first N joint blocks) on megatron-core.

    torchrun --nproc-per-node 2 pretrain_sd3.py --config configs/sd3_light_tiny.toml \\
        --pipeline-model-parallel-size 2 --mock-data --train-iters 50 --save ckpt --load ckpt

or ``bash launch.sh ...`` (SLURM or local). ``--help`` lists every flag; flags override the TOML.
"""
import os
import sys
import warnings

# megatron-core warns at import time about optional fused kernels (TE/apex) it falls back from.
for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                ".*full scope is deprecated.*", ".*tp_group is None.*", ".*pg_collection.*"):
    warnings.filterwarnings("ignore", message=pattern)
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")  # also for spawned helpers

if __name__ == "__main__":  # required: dist_checkpointing's async writer spawns a manager process
    from megatron_sd3.training.pretrain import main

    sys.exit(main())
