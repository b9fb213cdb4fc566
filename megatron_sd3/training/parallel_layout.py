"""How the joint blocks split over pipeline stages, and the up-front layout checks.

megatron-core places blocks from ``TransformerConfig.num_layers_in_first_pipeline_stage`` /
``num_layers_in_last_pipeline_stage`` (uneven first/last stages, even middle stages). This module
only chooses those two numbers: balanced automatically, or given by the user as a per-stage list
(``--pipeline-layers 8,7``) that must have that shape.
"""
from __future__ import annotations

from typing import Optional, Sequence


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the problem and the fix."""


def balanced_stage_layers(num_layers: int, pp: int) -> list[int]:
    """Blocks per stage, as even as megatron's first/last/middle rule allows (e.g. 15 on 2: 8, 7)."""
    if pp < 1:
        raise LayoutError(f"pipeline-model-parallel-size must be >= 1, got {pp}")
    if pp > num_layers:
        raise LayoutError(f"pipeline-model-parallel-size {pp} > num_layers {num_layers}: every stage "
                          f"needs at least one joint block; use at most {num_layers} stages")
    if pp == 1:
        return [num_layers]
    if pp == 2:
        return [num_layers - num_layers // 2, num_layers // 2]
    best = None
    for middle in range(1, num_layers):
        rest = num_layers - middle * (pp - 2)
        if rest < 2:
            break
        first, last = rest - rest // 2, rest // 2
        cand = [first] + [middle] * (pp - 2) + [last]
        if best is None or (max(cand), -min(cand)) < (max(best), -min(best)):
            best = cand
    return best


def stage_layers(num_layers: int, pp: int, given: Optional[Sequence[int]] = None) -> list[int]:
    """Per-stage block counts: ``given`` checked, else balanced."""
    if given is None:
        return balanced_stage_layers(num_layers, pp)
    given = [int(v) for v in given]
    if len(given) != pp:
        raise LayoutError(f"--pipeline-layers has {len(given)} entries for {pp} pipeline stages; give one per stage")
    if any(v < 1 for v in given) or sum(given) != num_layers:
        raise LayoutError(f"--pipeline-layers {given} must be >= 1 each and sum to num_layers={num_layers}")
    if pp > 2 and len(set(given[1:-1])) > 1:
        raise LayoutError(f"--pipeline-layers {given}: megatron-core needs equal middle stages "
                          f"(only the first and last may differ)")
    return given


def pipeline_config_fields(num_layers: int, pp: int, given: Optional[Sequence[int]] = None) -> dict:
    """``TransformerConfig`` fields for the split (empty when the split is even)."""
    layers = stage_layers(num_layers, pp, given)
    if pp == 1 or len(set(layers)) == 1:
        return {}
    return {"num_layers_in_first_pipeline_stage": layers[0],
            "num_layers_in_last_pipeline_stage": layers[-1]}


def check_layout(world_size: int, tp: int, pp: int, num_layers: int, num_heads: int, hidden: int,
                 global_batch: int, micro_batch: int, cp: int = 1) -> int:
    """Every rule checked before any work starts; returns the data-parallel size (processes
    over TP x PP x CP: context-parallel ranks share their samples)."""
    if tp < 1 or pp < 1 or cp < 1:
        raise LayoutError("tensor-, pipeline- and context-parallel sizes must be >= 1")
    if world_size % (tp * pp * cp):
        what, sizes = ("TP x PP x CP", f"{tp} x {pp} x {cp}") if cp > 1 else ("TP x PP", f"{tp} x {pp}")
        raise LayoutError(f"world size {world_size} is not divisible by {what} = {sizes}; "
                          f"launch a multiple of {tp * pp * cp} processes")
    if num_heads % tp:
        raise LayoutError(f"num_attention_heads {num_heads} is not divisible by "
                          f"tensor-model-parallel-size {tp}; choose a TP that divides it")
    if num_heads % (tp * cp):
        raise LayoutError(f"num_attention_heads {num_heads} is not divisible by tensor-model-parallel-size x "
                          f"context-parallel-size = {tp} x {cp} (the all-to-all hands each context-parallel "
                          f"rank whole heads); choose sizes whose product divides it")
    if hidden % tp:
        raise LayoutError(f"hidden_size {hidden} is not divisible by tensor-model-parallel-size {tp}")
    balanced_stage_layers(num_layers, pp)
    dp = world_size // (tp * pp * cp)
    if micro_batch < 1 or global_batch < 1:
        raise LayoutError("micro-batch-size and global-batch-size must be >= 1")
    if global_batch % (micro_batch * dp):
        raise LayoutError(f"global-batch-size {global_batch} is not divisible by micro-batch-size x "
                          f"data-parallel size = {micro_batch} x {dp}; use a multiple of {micro_batch * dp}")
    return dp
