"""Activation recomputation for the joint blocks, on megatron-core's checkpointing.

Megatron-LM's flags, read into ``TransformerConfig``'s fields:

* ``--recompute-granularity full``: whole joint blocks run under no-grad in the forward pass and
  again in the backward pass; only each checkpointed unit's inputs (``x``, ``c``, ``y``) are
  kept. ``--recompute-method uniform`` checkpoints units of ``--recompute-num-layers`` blocks
  each; ``block`` checkpoints the first ``--recompute-num-layers`` blocks of each pipeline stage
  (virtual stage) and keeps the rest. The units go through megatron-core's
  ``tensor_parallel.checkpoint`` (Transformer Engine's ``te_checkpoint`` for TE FP8), which
  saves and restores the CPU, CUDA and tensor-parallel tracker RNG states around the
  recomputation (``SD3Model._checkpointed_forward``, the same loop as megatron's
  ``TransformerBlock._checkpointed_forward``).
* ``--recompute-granularity selective``: every GEMM output is kept; the cheap, memory-heavy
  tensors between GEMMs are dropped after their consumer has run and recomputed just before its
  backward, with megatron-core's ``CheckpointWithoutOutput``. ``--recompute-modules`` picks them:

  - ``layernorm``: the adaLN-modulated norms ``LN(t) * (1 + scale) + shift`` in front of the
    attention and the MLP of both streams (the norm output and the modulated GEMM input);
  - ``qk_norm``: the qk-norms and the concatenation ``[x | c]`` of queries, keys and values that
    the attention kernel saves;
  - ``mlp_act``: the GELU output (the input of ``linear_fc2``), recomputed from ``linear_fc1``'s
    kept output.

  Kept: the block inputs, the outputs of every linear (qkv, output projection, ``linear_fc1``,
  ``linear_fc2``), the attention output and its softmax statistics, and the small ``[B, h]``
  adaLN chunks. With ``--torch-compile`` the compiler's partitioner already recomputes the
  elementwise work between GEMMs, so selective recomputation is for eager runs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from megatron.core import parallel_state, tensor_parallel

SELECTIVE_MODULES = ("layernorm", "qk_norm", "mlp_act")
"""The ``--recompute-modules`` of the joint block, all on by default with ``selective``."""


def selective_modules(config) -> frozenset:
    """The module names recomputed inside each block (empty unless granularity is selective)."""
    if getattr(config, "recompute_granularity", None) != "selective":
        return frozenset()
    return frozenset(config.recompute_modules or ())


def check_recompute_fields(granularity, method, num_layers, modules) -> Optional[str]:
    """One line naming the problem and the fix, or None. Run before megatron's own checks so the
    messages name Megatron-LM's flags."""
    if granularity is None:
        if method is not None or num_layers is not None or modules:
            return ("--recompute-method / --recompute-num-layers / --recompute-modules need "
                    "--recompute-granularity full or selective")
        return None
    if granularity not in ("full", "selective"):
        return f"--recompute-granularity must be full or selective, got {granularity!r}"
    if granularity == "full":
        if method not in ("uniform", "block"):
            return "--recompute-granularity full needs --recompute-method uniform or block"
        if num_layers is None or num_layers < 1:
            return "--recompute-granularity full needs --recompute-num-layers N >= 1"
        if modules:
            return "--recompute-modules is for --recompute-granularity selective"
        return None
    if method is not None or num_layers is not None:
        return ("--recompute-granularity selective recomputes inside every block: drop "
                "--recompute-method and --recompute-num-layers (they are for full)")
    bad = [m for m in (modules or ()) if m not in SELECTIVE_MODULES]
    if bad:
        return (f"--recompute-modules {' '.join(bad)} unknown for the joint block; choose from "
                f"{' '.join(SELECTIVE_MODULES)}")
    return None


def checkpoint_handler(config, transformer_impl: str, forward_func: Callable, *args):
    """megatron-core's checkpointing of one unit: TE's for TE FP8 (it restores the FP8 state for
    the recomputation), ``tensor_parallel.checkpoint`` otherwise (RNG states saved/restored)."""
    if config.fp8 and transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(forward_func, config.distribute_saved_activations,
                             tensor_parallel.random.get_cuda_rng_tracker,
                             parallel_state.get_tensor_model_parallel_group(), *args)
    return tensor_parallel.checkpoint(forward_func, config.distribute_saved_activations, *args)


class Region:
    """Outputs of ``fn(*args)`` dropped after their consumer ran, recomputed before its backward
    (megatron-core's ``CheckpointWithoutOutput``). ``active=False`` just calls ``fn``."""

    def __init__(self, active: bool):
        self.active = active and torch.is_grad_enabled()
        # The regions hold no FP8 GEMM (norms, concatenation, GELU): no FP8 state to restore,
        # which megatron's CheckpointWithoutOutput spells fp8=None.
        self._ck = tensor_parallel.CheckpointWithoutOutput(fp8=None) if self.active else None

    def __call__(self, fn: Callable, *args):
        if not self.active:
            return fn(*args)
        return self._ck.checkpoint(fn, *args)

    def release(self, hook_tensor: torch.Tensor) -> None:
        """After the consumer's forward: free the outputs; recompute them when ``hook_tensor``'s
        gradient arrives (which must precede the consumer's backward)."""
        if self.active:
            self._ck.discard_output_and_register_recompute(hook_tensor)


def release_all(regions: Iterable[Region], hook_tensor: torch.Tensor) -> None:
    for r in regions:
        r.release(hook_tensor)


__all__ = ["SELECTIVE_MODULES", "selective_modules", "check_recompute_fields", "checkpoint_handler",
           "Region", "release_all"]
