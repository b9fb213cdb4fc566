#!/usr/bin/env python
"""Pretrain sd3_light (SD3's MMDiT, first N joint blocks) on megatron-core.

    torchrun --nproc-per-node 2 pretrain_sd3.py --config configs/sd3_light_tiny.toml \\
        --pipeline-model-parallel-size 2 --mock-data --train-iters 50 --save ckpt --load ckpt

or ``bash launch.sh ...`` (SLURM or local), which first runs ``pretrain_sd3.py --check-config``
once. ``--help`` lists every flag; flags override the TOML.
"""
import logging
import re
import sys
import warnings

# Third-party notices a user cannot act on, silenced here (this entry point only, by exact
# message, so every other warning still shows). The arguments block says in one line whether
# Transformer Engine and apex are installed.
QUIET_WARNINGS = (
    # megatron-core, at import: optional fused kernels it falls back from
    (r"Transformer Engine and Apex are not installed", "megatron"),
    (r"Apex is not installed", "megatron"),
    # megatron-core's own TransformerConfig default
    (r"full scope is deprecated", "megatron"),
    (r"(Warning: )?tp_group is None", "megatron"),
    # megatron-core's dist_checkpointing load, calling torch's renamed API
    (r"`load_state_dict` is deprecated", "megatron"),
    # torch, at import, when nvidia-resiliency-ext's dependency pynvml is installed (a deprecated
    # alias of nvidia-ml-py, which is installed beside it)
    (r"The pynvml package is deprecated", "torch"),
    # torch.compile tracing the small lru_cache'd FP8 config builders (pure functions)
    (r"Dynamo detected a call to a `functools.lru_cache`-wrapped function at 'torchao\.py", "torch"),
)
QUIET_LOGS = {
    # torchao's optional CUDA extensions (MXFP8, CUTLASS sm90a) that this model does not use
    "torchao": re.compile(r"Failed to load \S*/torchao/_C\S*\.so: "),
    # torchao registers an Enum with torch's pytree at import
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}
for _message, _module in QUIET_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, module=_module)
for _logger, _pattern in QUIET_LOGS.items():
    logging.getLogger(_logger).addFilter(lambda record, p=_pattern: not p.search(record.getMessage()))

if __name__ == "__main__":  # required: dist_checkpointing's async writer spawns a manager process
    from megatron_sd3.training.pretrain import main

    sys.exit(main())
