"""FP8 settings shared by the backends: Megatron-LM's flags, their validation, token padding.

Formats (Megatron-LM's meaning of ``--fp8-format``)
    ``e4m3``: inputs, weights and output gradients all in float8_e4m3fn.
    ``hybrid``: inputs and weights e4m3 (forward), output gradients e5m2 (backward).

Recipes (``--fp8-recipe``)
    ``tensorwise``: dynamic (current) per-tensor scaling (TE calls it ``Float8CurrentScaling``);
    both backends.
    ``rowwise``: torchao's rowwise recipe: dynamic scales per row of each GEMM operand (per
    token for activations and output gradients, per output feature for weights), rounded down to
    powers of two, every operand e4m3 (``--fp8-format e4m3``); the ``torchao`` backend at TP=1
    (the scales of TP-split operands are not agreed across TP ranks).
    ``delayed``: scales from an amax history (``--fp8-amax-history-len``,
    ``--fp8-amax-compute-algo``); ``transformer_engine`` only (torchao 0.18 removed delayed
    scaling). :func:`recipe_problem` states these rules once; the backends' ``check`` and the
    command-line checks both use it.

Which GEMMs (``--fp8-gemms``)
    ``rule`` (pretrain_sd3.py's default): a joint block's GEMM runs in FP8 only where the
    step-time model (``megatron_sd3/step_time.py``, ``tools/fp8_plan.py``) puts its FP8 GEMMs plus
    their casts below its bf16 GEMMs, from its shape (rows = micro batch x tokens, in and out
    features per rank) on the run's GPU (H200 constants on an H200, H100's elsewhere and on CPU):
    the modulation (micro-batch rows) and, at sd3_light's width, every GEMM stay bf16. ``all``:
    every joint-block GEMM in FP8 (``Fp8Settings``' default, the backends' behaviour before the
    rule). :func:`gemm_in_fp8` is the one rule; the torchao backend applies it per GEMM. Transformer
    Engine puts every TE module inside its FP8 region in FP8: with TE the rule is not applied
    (``all``), and the environment report says so.

Shapes
    On a GPU ``torch._scaled_mm`` needs every GEMM dimension divisible by 16, including the token
    dimension (the inner dimension of the ``grad_weight`` GEMM). With FP8 on, ``make_config``
    pads the text stream to a multiple of 16 (``text_pad_multiple``; SD3's 333 tokens -> 336,
    zero pads at the end). The pads are sliced out of the attention sequence
    (``JointAttention.forward``), so real tokens see exactly the unpadded softmax; they are
    dropped before the text-recon loss and never part of the output. The image stream (256 or
    4096 patches) is already a multiple of 16, so every GEMM's token dimension (tokens x
    micro-batch) is one for any micro-batch size.

This module imports neither torchao nor Transformer Engine.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "rowwise", "delayed")
FP8_GEMMS = ("rule", "all")


def model_gpu(device_name: Optional[str]) -> str:
    """The step-time model's GPU for a device name: ``h200`` for an H200, ``h100`` otherwise."""
    return "h200" if device_name and "H200" in device_name.upper() else "h100"


@functools.lru_cache(maxsize=None)  # one decision per shape: the forward asks it per GEMM and micro batch
def _gemm_pays(m: int, k: int, n: int, on_cuda: bool) -> bool:
    import torch

    from megatron_sd3.step_time import Gemm, fp8_pays

    device_name = torch.cuda.get_device_name() if on_cuda else None
    return fp8_pays(Gemm("gemm", int(m), int(k), int(n)), model_gpu(device_name))


def gemm_in_fp8(gemms: str, m: int, k: int, n: int, on_cuda: bool = False) -> bool:
    """Whether a ``[m, k] x [k, n]`` joint-block GEMM runs in FP8 under ``--fp8-gemms gemms``."""
    if gemms == "all":
        return True
    if gemms != "rule":
        raise ValueError(f"--fp8-gemms must be one of {FP8_GEMMS}, got {gemms!r}")
    return _gemm_pays(m, k, n, on_cuda)


def recipe_problem(recipe: str, fp8_format: str, transformer_impl: str,
                   tensor_parallel: int = 1) -> Optional[str]:
    """The one line refusing ``--fp8-recipe`` with this backend / format / TP, or None."""
    if recipe == "delayed" and transformer_impl != "transformer_engine":
        return ("--fp8-recipe delayed needs --transformer-impl transformer_engine (torchao 0.18, which "
                "runs FP8 for --transformer-impl local, removed delayed scaling); use --fp8-recipe tensorwise")
    if recipe == "rowwise":
        if transformer_impl == "transformer_engine":
            return ("--fp8-recipe rowwise is torchao's recipe (--transformer-impl local); with "
                    "--transformer-impl transformer_engine use --fp8-recipe tensorwise or delayed")
        if fp8_format != "e4m3":
            return ("--fp8-recipe rowwise casts every operand to e4m3 (torchao's rowwise recipe); "
                    "use --fp8-format e4m3 with it")
        if tensor_parallel > 1:
            return ("--fp8-recipe rowwise runs at --tensor-model-parallel-size 1 only (its per-row "
                    "scales of TP-split operands are not agreed across TP ranks); use --fp8-recipe "
                    "tensorwise with tensor parallelism")
    return None


@dataclass(frozen=True)
class Fp8Settings:
    """FP8 flags with Megatron-LM's names and meanings.

    format: ``'e4m3'`` (everything e4m3) or ``'hybrid'`` (e4m3 forward, e5m2 gradients).
    recipe: ``'tensorwise'`` (dynamic per-tensor scaling), ``'rowwise'`` (dynamic per-row
        scaling; torchao, e4m3, TP=1) or ``'delayed'`` (amax history; TE only).
    amax_history_len / amax_compute_algo: delayed scaling's history (TE only; ignored otherwise).
    agree_amax_across_tp: all-reduce (MAX) the amax of TP-split operands over the TP group so the
        scales do not depend on TP (default on; off only to demonstrate the difference).
    gemms: ``'all'`` (every joint-block GEMM) or ``'rule'`` (:func:`gemm_in_fp8`).
    """

    format: str = "hybrid"
    recipe: str = "tensorwise"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    agree_amax_across_tp: bool = True
    gemms: str = "all"

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {self.format!r}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"--fp8-recipe must be one of {FP8_RECIPES}, got {self.recipe!r}")
        if self.gemms not in FP8_GEMMS:
            raise ValueError(f"--fp8-gemms must be one of {FP8_GEMMS}, got {self.gemms!r}")
        if self.amax_history_len < 1:
            raise ValueError(f"--fp8-amax-history-len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in ("most_recent", "max"):
            raise ValueError(
                f"--fp8-amax-compute-algo must be 'most_recent' or 'max', "
                f"got {self.amax_compute_algo!r}"
            )

    @classmethod
    def from_config(cls, config) -> Optional["Fp8Settings"]:
        """From a megatron ``TransformerConfig`` (``fp8``, ``fp8_recipe``, ...); None if fp8 off."""
        if not getattr(config, "fp8", None):
            return None
        recipe = getattr(config, "fp8_recipe", "tensorwise") or "tensorwise"
        recipe = getattr(recipe, "value", recipe)  # megatron's Fp8Recipe is a str enum
        return cls(
            format=str(config.fp8),
            recipe=str(recipe),
            amax_history_len=int(getattr(config, "fp8_amax_history_len", 1)),
            amax_compute_algo=str(getattr(config, "fp8_amax_compute_algo", "most_recent")),
            gemms=str(getattr(config, "fp8_gemms", "all")),
        )

    def transformer_config_kwargs(self) -> dict:
        """The megatron ``TransformerConfig`` fields for these settings."""
        return dict(
            fp8=self.format,
            fp8_recipe=self.recipe,
            fp8_amax_history_len=self.amax_history_len,
            fp8_amax_compute_algo=self.amax_compute_algo,
        )
