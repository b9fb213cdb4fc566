"""Layer specs of the MMDiT joint block: one spec, two fillings.

The spec names roles (column/row-parallel linear, qk-norm, core attention); a megatron-core
``BackendSpecProvider`` fills them:

* ``local``: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` (with a plain
  ``F.linear`` GEMM where no TP communication rides on it, see ``LocalColumnParallelLinear``),
  torch RMSNorm and a torch SDPA core attention (runs on CPU; megatron's local
  ``DotProductAttention`` needs CUDA).
  With FP8 on (``fp8=True``), the linears are the torchao-backed FP8 versions of the same layers.
* ``transformer_engine``: ``TEColumnParallelLinear`` / ``TERowParallelLinear`` /
  ``TEDotProductAttention`` / ``TENorm``. The adaLN modulation sits between norm and linear, so
  the fused LayerNorm-linear does not apply.
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_sd3.models.mmdit_layer import (
    JointAttention,
    JointAttentionSubmodules,
    MMDiTLayer,
    MMDiTLayerSubmodules,
    SDPACoreAttention,
)

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _plain_linear_ok(allreduce_dgrad=False, sequence_parallel=False, gradient_accumulation_fusion=False,
                     grad_output_buffer=None, **_) -> bool:
    """True when megatron's linear autograd function would compute exactly ``F.linear``: no
    dgrad all-reduce, no sequence-parallel gather, no fused main_grad accumulation, no deferred
    wgrad. (TP communication outside the GEMM -- copy-to / reduce-from the TP region -- stays in
    megatron's ``forward``.)"""
    return not (allreduce_dgrad or sequence_parallel or gradient_accumulation_fusion
                or grad_output_buffer is not None)


class LocalColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` whose GEMM is ``F.linear`` (one fused addmm, and
    autograd's own backward) whenever megatron's custom autograd function would do nothing more
    (e.g. TP = 1). megatron's function runs matmul + a separate bias add forward and a Python
    backward with extra copies: ~5% of a CPU training step at bench size (tools/bench_model.py).
    Same math; results agree with megatron's to float rounding (addmm vs matmul + add).

    ``skip_bias_add`` (which megatron's ``MLP`` always asks for, to fuse the bias into its
    activation) is honoured by adding the bias inside the GEMM and returning ``None`` as the
    bias, which ``MLP`` reads as "already added": the bias of a column-parallel layer is local
    to the rank, so where it is added does not change the math."""

    def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=False, **kwargs)

    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if _plain_linear_ok(**kwargs):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias=bias, **kwargs)


class LocalRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` with the same ``F.linear`` fast path. Its bias must be added after
    the TP all-reduce, so with TP > 1 megatron's forward runs unchanged; with TP = 1 (nothing to
    reduce) the whole layer is one ``F.linear`` with the bias fused, and ``skip_bias_add``
    returns ``None`` as the bias (already added)."""

    def forward(self, input_):
        if self.tp_group.size() == 1 and not self.sequence_parallel and _plain_linear_ok(
                gradient_accumulation_fusion=self.gradient_accumulation_fusion):
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_)

    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if _plain_linear_ok(**kwargs):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias=bias, **kwargs)


class SD3LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local filling with a CPU-capable core attention and torch norms."""

    def __init__(self, fp8: bool = False):
        self.fp8 = fp8

    def column_parallel_linear(self) -> type:
        if self.fp8:
            from megatron_sd3.fp8 import Float8ColumnParallelLinear

            return Float8ColumnParallelLinear
        return LocalColumnParallelLinear

    def row_parallel_linear(self) -> type:
        if self.fp8:
            from megatron_sd3.fp8 import Float8RowParallelLinear

            return Float8RowParallelLinear
        return LocalRowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


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


def get_spec_provider(transformer_impl: str = "local", fp8: bool = False) -> BackendSpecProvider:
    if transformer_impl == "local":
        return SD3LocalSpecProvider(fp8=fp8)
    if transformer_impl == "transformer_engine":
        require_transformer_engine()
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(f"unknown transformer_impl '{transformer_impl}'; choose one of {TRANSFORMER_IMPLS}")


def get_mmdit_layer_spec(transformer_impl: str = "local", qk_norm: bool = True,
                         fp8: bool = False) -> ModuleSpec:
    """The joint block's ``ModuleSpec`` for a backend."""
    backend = get_spec_provider(transformer_impl, fp8=fp8)
    norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else None
    attention = JointAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        linear_proj=backend.row_parallel_linear(),
        core_attention=backend.core_attention(),
        q_layernorm=norm,
        k_layernorm=norm,
    )
    return ModuleSpec(
        module=MMDiTLayer,
        submodules=MMDiTLayerSubmodules(
            joint_attention=ModuleSpec(module=JointAttention, submodules=attention),
            dual_attention=ModuleSpec(module=JointAttention, submodules=attention),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=backend.column_parallel_linear(),
                                         linear_fc2=backend.row_parallel_linear()),
            ),
        ),
    )
