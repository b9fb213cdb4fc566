"""The ``local`` backend: megatron-core's tensor-parallel linears, torch norms, torch SDPA.

Runs on CPU and GPU. The linears are megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` with a plain ``F.linear`` GEMM wherever megatron's custom autograd function
would compute nothing more (TP communication outside the GEMM stays megatron's). The core
attention is torch's ``scaled_dot_product_attention`` (megatron's local ``DotProductAttention``
needs CUDA). No FP8: ``--transformer-impl local`` with FP8 is the ``torchao`` backend.
"""
from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_sd3.backends import Backend, register_backend
from megatron_sd3.compat import GemmOverride


class SDPACoreAttention(MegatronModule):
    """Core attention on torch's ``scaled_dot_product_attention`` (runs on CPU and GPU).

    Same call contract as megatron-core's ``DotProductAttention`` / ``TEDotProductAttention``:
    ``query/key/value [s, b, heads_local, head_dim]`` -> ``[s, b, heads_local * head_dim]``.
    ``attention_mask`` follows megatron's convention (``True`` = masked out), broadcastable to
    ``[b, 1, s_q, s_k]``; megatron-core's local ``DotProductAttention`` needs a CUDA buffer.

    ``config.attention_backend`` (Megatron-LM's ``--attention-backend``) picks torch's kernel:
    ``flash`` -> FlashAttention-2, ``fused`` -> cuDNN fused attention (what TE's "fused" is),
    ``unfused``/``local`` -> the math path, ``auto`` -> torch's own choice. A kernel that cannot
    run the call raises (torch: "No viable backend") rather than silently falling back.
    """

    BACKENDS = {
        AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
        AttnBackend.fused: [SDPBackend.CUDNN_ATTENTION],
        AttnBackend.unfused: [SDPBackend.MATH],
        AttnBackend.local: [SDPBackend.MATH],
        AttnBackend.auto: None,
    }

    def __init__(self, config, layer_number, attn_mask_type=AttnMaskType.no_mask,
                 attention_type="self", **kwargs):
        super().__init__(config=config)
        self.backends = self.BACKENDS[config.attention_backend]

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **kwargs):
        s, b, n, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        keep = None if attention_mask is None else ~attention_mask
        if self.backends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.0)
        else:
            with sdpa_kernel(self.backends):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.0)
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


def _plain_linear_ok(allreduce_dgrad=False, sequence_parallel=False, gradient_accumulation_fusion=False,
                     grad_output_buffer=None, **_) -> bool:
    """True when megatron's linear autograd function would compute exactly ``F.linear``: no
    dgrad all-reduce, no sequence-parallel gather, no fused main_grad accumulation, no deferred
    wgrad. (TP communication outside the GEMM -- copy-to / reduce-from the TP region -- stays in
    megatron's ``forward``.)"""
    return not (allreduce_dgrad or sequence_parallel or gradient_accumulation_fusion
                or grad_output_buffer is not None)


class LocalColumnParallelLinear(GemmOverride, ColumnParallelLinear):
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

    def local_gemm(self, input, weight, bias=None, **kwargs):
        return F.linear(input, weight, bias) if _plain_linear_ok(**kwargs) else None


class LocalRowParallelLinear(GemmOverride, RowParallelLinear):
    """``RowParallelLinear`` with the same ``F.linear`` fast path. Its bias must be added after
    the TP all-reduce, so with TP > 1 megatron's forward runs unchanged; with TP = 1 (nothing to
    reduce) the whole layer is one ``F.linear`` with the bias fused, and ``skip_bias_add``
    returns ``None`` as the bias (already added)."""

    def forward(self, input_):
        if self.tp_group.size() == 1 and not self.sequence_parallel and _plain_linear_ok(
                gradient_accumulation_fusion=self.gradient_accumulation_fusion):
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_)

    def local_gemm(self, input, weight, bias=None, **kwargs):
        return F.linear(input, weight, bias) if _plain_linear_ok(**kwargs) else None


class SD3LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local filling with a CPU-capable core attention and torch norms."""

    def column_parallel_linear(self) -> type:
        return LocalColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return LocalRowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def check(fp8_settings=None) -> None:
    if fp8_settings is not None:  # reached only by calling this backend directly
        raise ValueError("the local backend has no FP8; FP8 with --transformer-impl local is the "
                         "torchao backend")


def _null_context(config, layer_no: int = -1):
    return contextlib.nullcontext()


BACKEND = register_backend(Backend(
    name="local", spec_provider=SD3LocalSpecProvider, check=check,
    pass_fp8_context=_null_context, layer_fp8_context=_null_context))
