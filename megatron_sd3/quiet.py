"""Third-party notices a user cannot act on, silenced by exact message in the entry points
(``pretrain_sd3.py``, ``python -m megatron_sd3.env``), so every other warning still shows. The
arguments block and the environment report say whether Transformer Engine and apex are installed.
Call :func:`silence_notices` before megatron-core, torchao or torch.compile are imported."""
import logging
import re
import warnings

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


def silence_notices() -> None:
    for message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for logger, pattern in QUIET_LOGS.items():
        logging.getLogger(logger).addFilter(lambda record, p=pattern: not p.search(record.getMessage()))
