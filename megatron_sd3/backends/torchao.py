"""The ``torchao`` backend: FP8 for ``--transformer-impl local``.

megatron-core's tensor-parallel linears with their *local GEMM* swapped for torchao's float8
training matmul: :class:`Float8ColumnParallelLinear` / :class:`Float8RowParallelLinear`.
Everything else (the copy/reduce/gather regions of tensor parallelism, parameter allocation and
initialisation, ``sharded_state_dict``) is megatron-core's, inherited unchanged; the rest of the
block (norms, core attention) is the ``local`` backend's. Settings: :mod:`.fp8_settings`.

How the GEMM is swapped
    megatron-core routes the GEMM of both parallel linears through one private hook; the one
    override of it is :class:`megatron_sd3.compat.GemmOverride`, and these layers implement its
    ``local_gemm`` when FP8 is on (FP8 off: megatron's own GEMM, bit for bit):

    * the GEMM is ``torchao.float8.float8_linear.matmul_with_hp_or_float8_args`` (torchao's
      autograd function: forward ``output``, backward ``grad_input`` and ``grad_weight`` GEMMs,
      each through ``Float8TrainingTensor`` -> ``torch._scaled_mm``), configured by a
      ``torchao.float8.Float8LinearConfig`` with dynamic tensorwise scaling;
    * the column layer's backward all-reduce of the input gradient (``allreduce_dgrad``) is done
      by megatron-core's ``copy_to_tensor_model_parallel_region`` (forward identity, backward
      all-reduce over the TP group) -- the same collective megatron issues, just not overlapped;
    * bias is added in high precision, as megatron does.

Agreed amax across TP ranks (so TP does not change the scales)
    Tensorwise scales must be those a single rank holding the full tensor would compute. Every
    operand that is *split* over the TP group gets its amax all-reduced (MAX) over the TP group
    before the scale is derived (torchao's ``tensor_to_amax`` + ``amax_to_scale`` +
    ``hp_tensor_and_scale_to_float8``): the weight of both layers, the input of the row layer
    (split along hidden) and the output gradient of the column layer (split along its output
    features). Replicated operands (the column layer's input, the row layer's output gradient)
    already have the same amax on every rank and are cast inside torchao's matmul. With this, FP8
    at TP=2 reproduces FP8 at TP=1 up to fp32 summation order (tests/unit/test_fp8.py). Under
    context parallelism every input and output gradient is cast with its amax agreed over TP x CP
    (megatron's TP x CP amax reduction group): the image stream's operands are CP chunks, the text
    stream's output gradients CP partial sums.

Recipes
    ``tensorwise`` (above) and ``rowwise``: torchao's own rowwise ``Float8LinearConfig`` (scales
    per row of every operand, rounded to powers of two, all e4m3), every operand cast inside
    torchao's matmul; TP=1 only, since per-row scales of a TP-split operand would need an
    all-reduce per row. torchao 0.18 has no delayed scaling (``ScalingType`` is only ``DYNAMIC``
    / ``DISABLED``), and it is not emulated with a hand-kept amax history: :func:`check` refuses
    ``delayed`` up front (``fp8_settings.recipe_problem``, the one statement of these rules).

Switching FP8 on
    The layers follow the switch set by :func:`fp8_context` (nestable, so a bf16 layer can be
    forced inside an FP8 region: ``--first-last-layers-bf16``). The switch is this module's
    stack, as Transformer Engine's ``fp8_autocast`` keeps a global state: a plain list, which
    ``torch.compile`` guards on. The backend's FP8 context policy is per layer
    (:func:`get_local_fp8_context`, the counterpart of megatron's
    ``fp8_utils.get_fp8_context(config, layer_no)``). A layer's ``fp8`` attribute (``None`` =
    follow the switch, ``True``/``False`` = force) overrides the switch for that layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core import parallel_state as ps

from megatron_sd3.backends import Backend, register_backend
from megatron_sd3.backends import fp8_settings
from megatron_sd3.backends.fp8_settings import FP8_FORMATS, Fp8Settings, gemm_in_fp8, recipe_problem
from megatron_sd3.backends.local import SD3LocalSpecProvider, _plain_linear_ok
from megatron_sd3.compat import GemmOverride

try:  # torchao is a soft dependency: only FP8 with the local backend needs it
    from torchao.float8.config import (
        CastConfig,
        Float8LinearConfig,
        ScalingGranularity,
        ScalingType,
        e4m3_dtype,
        e5m2_dtype,
    )
    from torchao.float8.distributed_utils import tensor_already_casted_to_fp8
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import (
        GemmInputRole,
        LinearMMConfig,
        ScaledMMConfig,
        hp_tensor_and_scale_to_float8,
    )
    from torchao.float8.float8_utils import amax_to_scale, tensor_to_amax

    HAVE_TORCHAO = True
except ImportError:  # pragma: no cover - exercised only where torchao is missing
    HAVE_TORCHAO = False

def require_torchao() -> None:
    if not HAVE_TORCHAO:
        raise RuntimeError(
            "FP8 with --transformer-impl local needs torchao (pip install torchao==0.18.*)"
        )


def check(fp8_settings: Optional[Fp8Settings] = None) -> None:
    """The torchao backend runs the tensorwise and rowwise recipes (``recipe_problem``), and
    needs torchao."""
    if fp8_settings is not None:
        problem = recipe_problem(fp8_settings.recipe, fp8_settings.format, "local")
        if problem:
            raise ValueError(problem)
    require_torchao()


# ---------------------------------------------------------------------------------------------
# torchao configuration
# ---------------------------------------------------------------------------------------------


def grad_dtype(settings: Fp8Settings) -> torch.dtype:
    require_torchao()
    return e4m3_dtype if settings.format == "e4m3" else e5m2_dtype


def float8_linear_config(settings: Fp8Settings) -> "Float8LinearConfig":
    """torchao ``Float8LinearConfig``: dynamic scaling of all three operands, tensorwise or
    rowwise (``settings.recipe``)."""
    return _configs(settings)[0]


def linear_mm_config(settings: Fp8Settings) -> "LinearMMConfig":
    """torchao ``LinearMMConfig`` (the three GEMMs' ``ScaledMMConfig``), as Float8Linear."""
    return _configs(settings)[1]


def _configs(settings: Fp8Settings) -> tuple:
    require_torchao()
    key = (settings.format, settings.recipe)
    if key not in _CONFIGS:
        raise ValueError(recipe_problem(settings.recipe, settings.format, "local")
                         or f"--fp8-recipe {settings.recipe} is not a torchao recipe; use tensorwise")
    return _CONFIGS[key]


def _build_float8_linear_config(fmt: str, recipe: str) -> "Float8LinearConfig":
    if recipe == "rowwise":  # torchao's own recipe (axiswise scales, powers of two, all e4m3)
        return Float8LinearConfig.from_recipe_name("rowwise")
    fwd = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.TENSORWISE, e4m3_dtype)
    grad_dtype = e4m3_dtype if fmt == "e4m3" else e5m2_dtype
    grad = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.TENSORWISE, grad_dtype)
    # gemm configs, pad_inner_dim, emulate: torchao's defaults (its "tensorwise" recipe).
    return Float8LinearConfig(
        cast_config_input=fwd, cast_config_weight=fwd, cast_config_grad_output=grad
    )


def _build_linear_mm_config(c: "Float8LinearConfig") -> "LinearMMConfig":
    # Exactly what torchao's Float8Linear.__init__ builds from its config.
    return LinearMMConfig(
        ScaledMMConfig(c.emulate, c.gemm_config_output.use_fast_accum, False, c.pad_inner_dim),
        ScaledMMConfig(c.emulate, c.gemm_config_grad_input.use_fast_accum, False, c.pad_inner_dim),
        ScaledMMConfig(
            c.emulate, c.gemm_config_grad_weight.use_fast_accum, False, c.pad_inner_dim
        ),
    )


def _build_configs() -> dict:
    """Every (format, recipe) this backend runs -> (Float8LinearConfig, LinearMMConfig).

    Built once at import, outside any compiled region, and looked up from this module's dict:
    torch.compile then reads them as guarded constants and traces a whole joint block, GEMMs,
    scales and casts, as one graph (docs/design.md §7). A config object created inside the
    traced code is one dynamo cannot wrap: it would break the graph at every GEMM."""
    out = {}
    for fmt in FP8_FORMATS:
        for recipe in ("tensorwise", "rowwise"):
            if recipe_problem(recipe, fmt, "local") is None:
                c = _build_float8_linear_config(fmt, recipe)
                out[(fmt, recipe)] = (c, _build_linear_mm_config(c))
    return out


_CONFIGS: dict = _build_configs() if HAVE_TORCHAO else {}

#: ``"block"`` (default): a compiled joint block is one graph. ``"gemm"``: a graph break before
#: every FP8 GEMM, so each GEMM with its casts is a compiled region of its own -- kept for
#: ``tools/bench_throughput.py --variants fp8-per-gemm``, which measures the two against each
#: other (docs/design.md §7 has the one measurement so far, of the MLP alone).
COMPILE_REGIONS = "block"


# ---------------------------------------------------------------------------------------------
# Casting with a TP-agreed amax (torchao primitives)
# ---------------------------------------------------------------------------------------------


def _tp_group_to_reduce(group) -> Optional[dist.ProcessGroup]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return group if dist.get_world_size(group) > 1 else None


def _cp_amax_group() -> Optional[dist.ProcessGroup]:
    """Under context parallelism, megatron's TP x CP amax reduction group (Transformer Engine's
    ``get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=True)``); else None."""
    if not dist.is_available() or not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    if ps.get_context_parallel_world_size() <= 1:
        return None
    return ps.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=True)


def _reducible(amax: torch.Tensor) -> torch.Tensor:
    """An amax in a dtype every backend all-reduces: bf16 widened to fp32, fp32 and float64 as
    they are (no rounding: a float64 scale must not depend on the layout)."""
    return amax.to(torch.promote_types(amax.dtype, torch.float32))


@torch.no_grad()
def _agreed_scale(hp: torch.Tensor, float8_dtype: torch.dtype, group) -> torch.Tensor:
    """torchao's tensorwise scale, from the amax over all ranks of ``group`` (None: local)."""
    amax = tensor_to_amax(hp, scaling_granularity=ScalingGranularity.TENSORWISE)
    if group is not None:
        amax = _reducible(amax).clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax_to_scale(amax, float8_dtype)


def _cast_agreed(hp, float8_dtype, mm_config, role, group):
    """hp -> Float8TrainingTensor with a TP-agreed tensorwise scale (gradient: pass-through)."""
    scale = _agreed_scale(hp, float8_dtype, group)
    return hp_tensor_and_scale_to_float8(hp, scale, float8_dtype, mm_config, role)


class _GradToFloat8AgreedAmax(torch.autograd.Function):
    """Forward: identity. Backward: cast the gradient to float8 with a TP-agreed scale.

    torchao's ``NoopFwToFloat8BwDynamic`` with the amax all-reduced over the TP group: used on
    the column layer's output, whose gradient is split over TP. The float8 gradient then reaches
    ``matmul_with_hp_or_float8_args.backward``, which takes an already-cast operand as is.
    """

    @staticmethod
    def forward(ctx, tensor, linear_mm_config, target_dtype, group):
        ctx.linear_mm_config = linear_mm_config
        ctx.target_dtype = target_dtype
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        if tensor_already_casted_to_fp8(grad):
            return grad, None, None, None
        grad8 = _cast_agreed(
            grad, ctx.target_dtype, ctx.linear_mm_config, GemmInputRole.GRAD_OUTPUT, ctx.group
        )
        return grad8, None, None, None


def float8_parallel_gemm(
    input: torch.Tensor,
    weight: torch.Tensor,
    settings: Fp8Settings,
    tp_group=None,
    *,
    input_is_split: bool,
    grad_output_is_split: bool,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``input @ weight.t()`` in float8 (forward and both backward GEMMs) via torchao.

    ``weight`` is this rank's shard; its amax (and that of the split operands named by the
    flags) is all-reduced over ``tp_group`` when ``settings.agree_amax_across_tp``.
    ``weight_scale``: the weight's tensorwise scale, computed already (:func:`weight_scales_for_step`).
    """
    config, mm_config = _configs(settings)
    if COMPILE_REGIONS == "gemm":
        torch._dynamo.graph_break()
    if settings.recipe == "rowwise":
        # per-row scales, all computed inside torchao's matmul from this rank's operands: exact
        # only when nothing is split over TP (recipe_problem refuses TP > 1 up front)
        if _tp_group_to_reduce(tp_group) is not None:
            raise ValueError(recipe_problem("rowwise", settings.format, "local", dist.get_world_size(tp_group)))
        # 2-D before the cast: torchao cannot reshape (copy) a non-contiguous row-scaled operand
        flat = input.reshape(-1, input.shape[-1])
        out = matmul_with_hp_or_float8_args.apply(flat, weight.t(), mm_config, config)
        return out.view(*input.shape[:-1], out.shape[-1])
    group = _tp_group_to_reduce(tp_group) if settings.agree_amax_across_tp else None

    # Weight: always pre-cast (scale from the amax over all TP shards). torchao's matmul uses an
    # already-cast operand as is, in the forward and in the grad_input GEMM.
    if weight_scale is None:
        weight_t = _cast_agreed(weight.t(), e4m3_dtype, mm_config, GemmInputRole.WEIGHT, group)
    else:
        weight_t = hp_tensor_and_scale_to_float8(weight.t(), weight_scale, e4m3_dtype, mm_config,
                                                 GemmInputRole.WEIGHT)
    # Input: split over TP (row layer) -> pre-cast with an agreed amax; replicated (column
    # layer) -> torchao casts it inside (same amax on all ranks anyway). Under context
    # parallelism every input and output gradient is agreed over TP x CP: the image stream's are
    # split into CP chunks, and the text stream's gradients are CP partial sums.
    cp_group = _cp_amax_group() if settings.agree_amax_across_tp else None
    if cp_group is not None or (input_is_split and group is not None):
        input = _cast_agreed(input, e4m3_dtype, mm_config, GemmInputRole.INPUT, cp_group or group)
    output = matmul_with_hp_or_float8_args.apply(input, weight_t, mm_config, config)
    if cp_group is not None or (grad_output_is_split and group is not None):
        output = _GradToFloat8AgreedAmax.apply(output, mm_config, grad_dtype(settings), cp_group or group)
    return output


# ---------------------------------------------------------------------------------------------
# The switch and the FP8 context policy (per layer)
# ---------------------------------------------------------------------------------------------

# (enabled, settings) -- a stack so contexts nest; the bottom entry is "off".
_FP8_STACK: list = [(False, None)]


def fp8_enabled() -> bool:
    return bool(_FP8_STACK[-1][0])


def current_fp8_settings() -> Optional[Fp8Settings]:
    """The active settings, or None when FP8 is off."""
    enabled, settings = _FP8_STACK[-1]
    return settings if enabled else None


@contextlib.contextmanager
def fp8_context(
    enabled: bool = True,
    format: str = "hybrid",
    recipe: str = "tensorwise",
    settings: Optional[Fp8Settings] = None,
) -> Iterator[Optional[Fp8Settings]]:
    """``fp8_autocast`` for this backend: the FP8 parallel linears run in FP8 inside it.

    ``settings`` wins over ``format``/``recipe``. ``enabled=False`` forces high precision inside
    an enclosing FP8 region (first/last layers in bf16). Only ``tensorwise`` can be entered.
    """
    if enabled:
        if settings is None:
            settings = Fp8Settings(format=format, recipe=recipe)
        check(settings)
    _FP8_STACK.append((bool(enabled), settings if enabled else None))
    try:
        yield settings if enabled else None
    finally:
        _FP8_STACK.pop()


def get_local_fp8_context(config, layer_no: int = -1):
    """The counterpart of ``fp8_utils.get_fp8_context(config, layer_no)`` for this backend.

    FP8 off in the config -> a no-op context; a ``--first-last-layers-bf16`` layer ->
    ``fp8_context(False)`` (high precision even inside an outer FP8 region); else FP8 on.
    """
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    settings = Fp8Settings.from_config(config)
    if settings is None:
        return contextlib.nullcontext()
    if is_first_last_bf16_layer(config, layer_no):
        return fp8_context(enabled=False)
    return fp8_context(enabled=True, settings=settings)


# ---------------------------------------------------------------------------------------------
# Weight scales once per step
# ---------------------------------------------------------------------------------------------

#: Compute the FP8 weights' tensorwise scales once per training step (True), or inside every
#: GEMM, once per micro batch (False: the layers as called outside a training step).
PRECOMPUTE_WEIGHT_SCALES = True


def _fp8_layers(chunks) -> list:
    return [m for c in chunks for m in c.modules()
            if isinstance(m, _Float8LocalGemmMixin) and not m.explicit_expert_comm]


@contextlib.contextmanager
def weight_scales_for_step(chunks, config) -> Iterator[int]:
    """The backend's ``step_context``: the weights do not change during an iteration's forward and
    backward passes, so their scales are computed once, before them, for every FP8 layer at once:
    one ``torch._foreach_norm(ord=inf)`` for all amaxes (one multi-tensor kernel), one all-reduce
    (MAX) over the TP group for all of them, ``amax_to_scale`` on the lot. Each layer keeps its
    scale in a buffer (updated in place, so a compiled block or a CUDA graph reads the new value)
    and uses it while the context is open; the same scales as each GEMM computes alone, bit for
    bit (the amax is exact in any float type). Yields the number of layers it prepared (0: FP8
    off, another recipe, or ``PRECOMPUTE_WEIGHT_SCALES`` off)."""
    settings = Fp8Settings.from_config(config)
    layers = (_fp8_layers(chunks) if PRECOMPUTE_WEIGHT_SCALES and settings is not None
              and settings.recipe == "tensorwise" else [])
    if not layers:
        yield 0
        return
    with torch.no_grad():
        amax = _reducible(torch.stack(torch._foreach_norm([m.weight for m in layers], ord=float("inf"))))
        group = _tp_group_to_reduce(layers[0].tp_group) if settings.agree_amax_across_tp else None
        if group is not None:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        scales = amax_to_scale(amax, e4m3_dtype)
        for m, scale in zip(layers, scales):
            buf = getattr(m, "_fp8_weight_scale", None)
            if buf is None or buf.device != scale.device:
                m.register_buffer("_fp8_weight_scale", scale.clone(), persistent=False)
            else:
                buf.copy_(scale)
            m.fp8_weight_scale_ready = True
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.fp8_weight_scale_ready = False


# ---------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------


# Inside a compiled joint block the rule is a constant of the graph (shapes are static): marked
# here, by its one caller in compiled code, as the mark imports torch._dynamo, which importing the
# training loop does not (megatron_sd3/lazy_compile.py)
torch.compiler.assume_constant_result(fp8_settings._gemm_pays)


class _Float8LocalGemmMixin(GemmOverride):
    """Shared by both layers: decide per forward whether the GEMM runs in FP8."""

    #: None: follow :func:`fp8_context`; True/False: force FP8 on/off for this layer.
    fp8: Optional[bool] = None
    #: settings used when ``fp8 is True`` outside any context (default: hybrid tensorwise).
    fp8_settings: Optional[Fp8Settings] = None
    #: True inside :func:`weight_scales_for_step`: the buffer ``_fp8_weight_scale`` holds this
    #: step's weight scale
    fp8_weight_scale_ready: bool = False

    def _weight_scale(self) -> Optional[torch.Tensor]:
        return self._fp8_weight_scale if self.fp8_weight_scale_ready else None

    def _active_fp8_settings(self) -> Optional[Fp8Settings]:
        if self.fp8 is False:
            return None
        settings = current_fp8_settings()
        if settings is None and self.fp8:
            settings = self.fp8_settings or Fp8Settings()
        return settings

    @staticmethod
    def _pays(settings: Fp8Settings, input: torch.Tensor, weight: torch.Tensor) -> bool:
        """``--fp8-gemms``: this GEMM's shape on this rank through the one rule (fp8_settings.py)."""
        return gemm_in_fp8(settings.gemms, input.numel() // input.shape[-1], weight.shape[1], weight.shape[0],
                           input.is_cuda)

    @staticmethod
    def _declined(input, weight, bias, **kwargs):
        """A GEMM the rule keeps in high precision: the local backend's (``F.linear`` where megatron's
        autograd function would add nothing, as a bf16 run of ``--transformer-impl local``; else
        megatron's own)."""
        return F.linear(input, weight, bias) if _plain_linear_ok(**kwargs) else None

    @staticmethod
    def _check_fp8_supported(sequence_parallel, grad_output_buffer):
        if sequence_parallel:
            raise NotImplementedError(
                "FP8 with --transformer-impl local does not support --sequence-parallel"
            )
        if grad_output_buffer is not None:
            raise NotImplementedError(
                "FP8 with --transformer-impl local does not support deferred embedding wgrad"
            )


class Float8ColumnParallelLinear(_Float8LocalGemmMixin, ColumnParallelLinear):
    """megatron-core ``ColumnParallelLinear`` whose GEMMs run in FP8 (torchao) when enabled.

    Same constructor as ``ColumnParallelLinear``; drop-in in a ``ModuleSpec``.
    """

    def local_gemm(self, input, weight, bias=None, allreduce_dgrad=False, sequence_parallel=False,
                   grad_output_buffer=None, tp_group=None, **kwargs):
        settings = self._active_fp8_settings()
        if settings is None:
            return None
        if not self._pays(settings, input, weight):
            return self._declined(input, weight, bias, allreduce_dgrad=allreduce_dgrad,
                                  sequence_parallel=sequence_parallel, grad_output_buffer=grad_output_buffer, **kwargs)
        self._check_fp8_supported(sequence_parallel, grad_output_buffer)
        tp_group = tp_group or self.tp_group
        if allreduce_dgrad:
            # megatron's forward-identity / backward-all-reduce region replaces the all-reduce
            # LinearWithGradAccumulationAndAsyncCommunication would have done on grad_input.
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = float8_parallel_gemm(
            input,
            weight,
            settings,
            tp_group if not self.explicit_expert_comm else None,
            input_is_split=False,
            grad_output_is_split=True,
            weight_scale=self._weight_scale(),
        )
        if bias is not None:
            output = output + bias
        return output


class Float8RowParallelLinear(_Float8LocalGemmMixin, RowParallelLinear):
    """megatron-core ``RowParallelLinear`` whose GEMMs run in FP8 (torchao) when enabled.

    Same constructor as ``RowParallelLinear``; drop-in in a ``ModuleSpec``.
    """

    def local_gemm(self, input, weight, bias=None, allreduce_dgrad=False, grad_output_buffer=None,
                   **kwargs):
        settings = self._active_fp8_settings()
        if settings is None:
            return None
        if not self._pays(settings, input, weight):
            return self._declined(input, weight, bias, allreduce_dgrad=allreduce_dgrad,
                                  grad_output_buffer=grad_output_buffer, **kwargs)
        self._check_fp8_supported(False, grad_output_buffer)
        assert not allreduce_dgrad
        output = float8_parallel_gemm(
            input,
            weight,
            settings,
            self.tp_group if not self.explicit_expert_comm else None,
            input_is_split=True,
            grad_output_is_split=False,
            weight_scale=self._weight_scale(),
        )
        if bias is not None:  # megatron passes None here (the bias follows the all-reduce)
            output = output + bias
        elif torch.compiler.is_compiling() and self.tp_group is not None and self.tp_group.size() > 1:
            # megatron all-reduces this output in place; under torch.compile an in-place op on
            # the output of torchao's autograd.Function (a view of its GEMM result) is refused
            output = output.clone()
        return output


class Float8LocalSpecProvider(SD3LocalSpecProvider):
    """The ``local`` filling with the FP8-capable parallel linears (megatron's own GEMM when FP8
    is off, so the same spec serves bf16 and FP8 runs)."""

    def column_parallel_linear(self) -> type:
        return Float8ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return Float8RowParallelLinear


BACKEND = register_backend(Backend(
    name="torchao", spec_provider=Float8LocalSpecProvider, check=check,
    pass_fp8_context=lambda config: contextlib.nullcontext(),
    layer_fp8_context=get_local_fp8_context, step_context=weight_scales_for_step))
