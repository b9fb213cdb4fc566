#!/usr/bin/env python
"""Pretrain sd3_light (SD3's MMDiT, first N joint blocks) on megatron-core.

    torchrun --nproc-per-node 2 pretrain_sd3.py --config configs/sd3_light_tiny.toml \\
        --pipeline-model-parallel-size 2 --mock-data --train-iters 50 --save ckpt --load ckpt

or ``bash launch.sh ...`` (SLURM or local), which first runs ``pretrain_sd3.py --check-config``
once. ``--help`` lists every flag; flags override the TOML.
"""
import sys

from megatron_sd3.quiet import silence_notices

silence_notices()  # third-party notices a user cannot act on (megatron_sd3/quiet.py)

if __name__ == "__main__":  # required: dist_checkpointing's async writer spawns a manager process
    from megatron_sd3.training.pretrain import main

    sys.exit(main())
