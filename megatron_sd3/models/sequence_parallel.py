"""Sequence parallelism (``--sequence-parallel``, megatron-core's ``config.sequence_parallel``).

With TP > 1 and sequence parallelism, every TP rank holds a contiguous slice (along ``seq``) of
the image stream and of the text stream between the tensor-parallel regions (adaLN modulation,
gates, residuals, norms, the MLP's input/output). megatron-core's column-parallel linears
all-gather their input along ``seq`` (so the qkv projections give every rank the *full*
sequence of its heads, and the joint attention sees all of ``[x | c]``), the row-parallel
linears reduce-scatter their output back to the slices. What this module adds around that:

* the first stage's embeddings run replicated and :func:`scatter` hands each rank its slice
  (backward: all-gather); the last stage :func:`gather` s the slices back for the replicated head
  and the loss (backward: each rank keeps its slice of the replicated gradient);
* ``y`` (timestep + pooled conditioning, one token) stays replicated. The blocks use it through
  :func:`enter_blocks` (megatron's ``copy_to_tensor_model_parallel_region``: identity forward,
  all-reduce of the gradient backward), because each rank's slice contributes only part of
  ``dL/dy``; the head and the pipeline message use ``y`` as it is;
* the adaLN linears act on the replicated ``y`` but their outputs scale and gate sequence slices,
  so their gradients are per-rank partial sums: :func:`mark_sequence_parallel` sets megatron's
  ``sequence_parallel`` attribute on them, and ``finalize_model_grads``
  (``_allreduce_non_tensor_model_parallel_grads``) all-reduces them over TP, as it does for
  megatron's own layernorm weights and row-parallel biases;
* the pipeline message holds this rank's slices plus the replicated ``y``
  (``packing.ActivationLayout`` with ``sp = TP``): ``seq_len / TP`` tokens per rank, which is
  the shape megatron's schedules derive (``get_tensor_shapes``: ``seq_length // TP``).

Each stream must split evenly over TP: the text stream is padded to a multiple of TP (on top of
the FP8 padding; the pads stay out of the attention, see ``JointAttention.forward``); the image
token count must be a multiple of TP (:func:`check_image_tokens` says so in one line).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megatron_sd3.config import ConfigError


def size(config) -> int:
    """How many ranks split the sequence (1 when sequence parallelism is off)."""
    return config.tensor_model_parallel_size if getattr(config, "sequence_parallel", False) else 1


def text_len(config, padded: Optional[int] = None) -> int:
    """Text tokens as they travel: the FP8-padded length (``padded``, default the declared
    ``text_seq_len`` padded), then rounded up to a multiple of the SP size."""
    n, k = (config.padded_text_len if padded is None else padded), size(config)
    return int(math.ceil(n / k) * k)


def check_image_tokens(config, n_img: int) -> None:
    """One line (a ``ConfigError``, which ``pretrain_sd3.py`` prints as such) when the image
    stream does not split evenly over the sequence-parallel ranks."""
    k = size(config)
    if n_img % k:
        raise ConfigError(
            f"--sequence-parallel splits the {n_img} image tokens over tensor-model-parallel-size "
            f"{k}, which does not divide them; use a latent size whose patch count "
            f"(H/{config.patch_size} x W/{config.patch_size}) is a multiple of {k}, or drop "
            f"--sequence-parallel")


def scatter(config, t: torch.Tensor) -> torch.Tensor:
    """Full replicated ``[S, B, h]`` -> this rank's ``[S/TP, B, h]`` slice."""
    return scatter_to_sequence_parallel_region(t) if size(config) > 1 else t


def gather(config, t: torch.Tensor) -> torch.Tensor:
    """This rank's slice -> the full ``[S, B, h]``, for replicated computation after it (its
    gradient is replicated, so the backward keeps this rank's slice of it: no reduction)."""
    if size(config) == 1:
        return t
    return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False)


def enter_blocks(config, y: torch.Tensor) -> torch.Tensor:
    """The replicated ``y`` as the joint blocks use it: gradient all-reduced over TP."""
    return copy_to_tensor_model_parallel_region(y) if size(config) > 1 else y


def tp_region_config(config):
    """The config for a norm that sits *inside* a tensor-parallel region (the qk-norm: this rank's
    heads over the whole all-gathered sequence), where sequence parallelism does not apply.
    megatron's torch norm refuses any ``config.sequence_parallel``; the qk-norm's gradient is
    summed over TP by ``finalize_model_grads`` through ``config.qk_layernorm`` either way."""
    if not getattr(config, "sequence_parallel", False):
        return config
    out = copy.copy(config)
    out.sequence_parallel = False
    return out


def mark_sequence_parallel(config, *modules) -> None:
    """Mark replicated parameters whose gradients come from sequence slices (megatron's
    ``sequence_parallel`` attribute: ``finalize_model_grads`` all-reduces them over TP)."""
    if not getattr(config, "sequence_parallel", False):
        return
    for m in modules:
        for p in m.parameters():
            setattr(p, "sequence_parallel", True)
