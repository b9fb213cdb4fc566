"""The ``transformer_engine`` backend: Transformer Engine modules under megatron-core's FP8 context.

Fills the spec with megatron-core's own ``TESpecProvider`` (``TEColumnParallelLinear`` /
``TERowParallelLinear`` / ``TEDotProductAttention`` / ``TENorm``; the adaLN modulation sits
between norm and linear, so the fused LayerNorm-linear does not apply). FP8 is megatron-core's
``fp8_utils.get_fp8_context`` (TE's recipe from ``config.fp8`` / ``fp8_recipe`` /
``fp8_amax_history_len`` / ..., the amax-reduction group of parallel_state), entered as
megatron-core's ``TransformerBlock.forward`` enters it: once around the whole pass for the
``delayed`` recipe, around each layer otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from megatron_sd3.backends import Backend, register_backend
from megatron_sd3.backends.fp8_settings import Fp8Settings, recipe_problem


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def require_transformer_engine() -> None:
    """One clear line when TE is asked for but absent."""
    if not transformer_engine_available():
        raise RuntimeError(
            "--transformer-impl transformer_engine needs NVIDIA Transformer Engine, which is not "
            "installed; install it (pip install transformer_engine[pytorch]) or use "
            "--transformer-impl local")


def check(fp8_settings: Optional[Fp8Settings] = None) -> None:
    if fp8_settings is not None:
        problem = recipe_problem(fp8_settings.recipe, fp8_settings.format, "transformer_engine")
        if problem:
            raise ValueError(problem)
    require_transformer_engine()


def spec_provider():
    require_transformer_engine()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def te_fp8_context(config, layer_no: int = -1, is_init: bool = False):
    """megatron-core's own FP8 context (``fp8_utils.get_fp8_context``): TE's ``fp8_autocast``, or
    a null context for bf16 layers / FP8 off. Without TE megatron silently returns a null
    context; here asking for FP8 without TE is an error instead."""
    if getattr(config, "fp8", None):
        require_transformer_engine()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config, layer_no=layer_no, is_init=is_init)


def _delayed(config) -> bool:
    settings = Fp8Settings.from_config(config)
    return settings is not None and settings.recipe == "delayed"


def pass_fp8_context(config):
    """The delayed recipe: one FP8 region around all blocks (one amax reduction per pass)."""
    return te_fp8_context(config) if _delayed(config) else contextlib.nullcontext()


def layer_fp8_context(config, layer_no: int):
    """Other recipes: one FP8 region per block (``--first-last-layers-bf16`` applies)."""
    if not getattr(config, "fp8", None) or _delayed(config):
        return contextlib.nullcontext()
    return te_fp8_context(config, layer_no)


BACKEND = register_backend(Backend(
    name="transformer_engine", spec_provider=spec_provider, check=check,
    pass_fp8_context=pass_fp8_context, layer_fp8_context=layer_fp8_context))
