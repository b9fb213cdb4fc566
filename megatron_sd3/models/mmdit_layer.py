"""The MMDiT joint block as megatron-core modules built from a ``ModuleSpec``.

One block (image stream ``x``, text stream ``c``, conditioning ``y = t_emb + pooled_emb``):

    adaLN-Zero per stream: shift/scale/gate chunks from ``Linear(SiLU(y))``
    qkv per stream (column-parallel, heads split over TP), optional RMS qk-norm per stream,
    ONE attention over the concatenated sequence [x | c],
    output projection per stream (row-parallel), gated residual,
    [MMDiT-X: a second, image-only attention with its own adaLN chunks]
    GELU(tanh) MLP per stream (megatron-core ``MLP``), gated residual.

Which submodule types are used (megatron-core local layers or Transformer Engine layers) is the
spec's business (``mmdit_layer_specs.py``, filled by a ``megatron_sd3.backends`` backend); what a block computes depends only on the config and
its global 1-based ``layer_number`` (dual attention, ``context_pre_only``).

Layout is megatron's ``[seq, batch, hidden]`` throughout; tensors of shape ``[batch, hidden]``
(``y`` and the adaLN chunks) broadcast over the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide

from megatron_sd3.config import SD3Config
from megatron_sd3.models import context_parallel as cp
from megatron_sd3.recompute import Region, release_all, selective_modules
from megatron_sd3.models.sequence_parallel import mark_sequence_parallel, tp_region_config


@dataclass
class JointAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = IdentityOp  # IdentityOp when qk-norm is off
    k_layernorm: Union[ModuleSpec, type] = IdentityOp


class JointAttention(MegatronModule):
    """Attention over the concatenation of an image stream and (optionally) a text stream.

    Each stream has its own fused qkv projection (rows ordered ``[head, (q, k, v), head_dim]`` so
    a contiguous TP split hands each rank whole heads), its own qk-norms and its own output
    projection. ``with_context=False`` is plain self-attention (MMDiT-X's second attention);
    ``context_output=False`` has no text output projection (``context_pre_only``). The text
    part of the attention output is returned unprojected; ``project_context`` projects it, so a
    block that does not need its text output never runs that GEMM.
    """

    def __init__(self, config: SD3Config, submodules: JointAttentionSubmodules, layer_number: int,
                 with_context: bool = True, context_output: bool = True):
        super().__init__(config=config)
        h = config.hidden_size
        self.head_dim = config.kv_channels
        self.heads_local = divide(config.num_attention_heads, config.tensor_model_parallel_size)
        self.with_context, self.context_output = with_context, with_context and context_output
        lin = dict(config=config, init_method=config.init_method, bias=True,
                   skip_bias_add=False, is_expert=False)
        # Plain attributes (megatron's names; "context_" for the text stream) rather than a
        # ModuleDict, so each TP layer contributes its own sharded_state_dict.
        for pre in ["", "context_"] if with_context else [""]:
            setattr(self, pre + "linear_qkv", build_module(
                submodules.linear_qkv, h, 3 * h, gather_output=False, tp_comm_buffer_name="qkv", **lin))
            for name in ("q_layernorm", "k_layernorm"):
                setattr(self, pre + name, build_module(
                    getattr(submodules, name), config=tp_region_config(config), hidden_size=self.head_dim,
                    eps=config.layernorm_epsilon))
            if pre == "" or self.context_output:
                setattr(self, pre + "linear_proj", build_module(
                    submodules.linear_proj, h, h, input_is_parallel=True, tp_comm_buffer_name="proj",
                    **{**lin, "init_method": config.output_layer_init_method}))
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask, attention_type="self")

    def _qkv_norm(self, pre: str, out: torch.Tensor, norm: bool = True):
        s, b = out.shape[:2]
        q, k, v = out.view(s, b, self.heads_local, 3, self.head_dim).unbind(dim=3)
        if norm:  # IdentityOp when the config has no qk-norm
            q = getattr(self, pre + "q_layernorm")(q)
            k = getattr(self, pre + "k_layernorm")(k)
        return q, k, v

    def _joint_qkv(self, qkv: torch.Tensor, qkv_c: torch.Tensor, n_pad: int):
        q, k, v = self._qkv_norm("", qkv)
        qc, kc, vc = self._qkv_norm("context_", qkv_c)
        if n_pad:
            qc, kc, vc = qc[:-n_pad], kc[:-n_pad], vc[:-n_pad]
        # Concatenated batch-major ([b, S, n, d], handed on as an [S, b, n, d] view): the
        # attention kernel then reads each head's sequence with a stride of one row of h
        # (as diffusers' layout) rather than b rows; same values, ~2% of a CPU step.
        return tuple(torch.cat([t.transpose(0, 1) for t in pair], dim=1).transpose(0, 1)
                     for pair in ((q, qc), (k, kc), (v, vc)))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None,
                text_len: Optional[int] = None):
        """``text_len``: how many of ``c``'s tokens are real when the text stream is padded (FP8
        GEMM alignment). The pads are left out of the attention sequence itself, so no mask is
        needed and the fused (flash/cuDNN) kernels stay usable; their attention output is zero."""
        # selective "qk_norm": the qk-norms and the concatenation are dropped once the attention
        # kernel has saved them and recomputed from the kept qkv GEMM outputs (recompute.py)
        region = Region("qk_norm" in selective_modules(self.config)
                        and (self.with_context or self.config.qk_norm))
        qkv = self.linear_qkv(x)[0]
        # the whole stream (this rank's context-parallel chunk of it) also with sequence
        # parallelism (qkv all-gathers)
        n_img = qkv.shape[0]
        n_pad = 0
        if self.with_context:
            qkv_c = self.context_linear_qkv(c)[0]
            if text_len is not None and text_len < qkv_c.shape[0]:
                n_pad = qkv_c.shape[0] - text_len
            q, k, v = region(lambda a, b: self._joint_qkv(a, b, n_pad), qkv, qkv_c)
        elif region.active:  # v stays a view of the kept GEMM output
            q, k = region(lambda t: self._qkv_norm("", t)[:2], qkv)
            v = self._qkv_norm("", qkv, norm=False)[2]
        else:
            q, k, v = self._qkv_norm("", qkv)
        cp_size = cp.size(self.config)
        if cp_size > 1:  # Ulysses: every image token of this rank's heads (context_parallel.py)
            q, k, v = cp.qkv_heads_to_sequence(q, k, v, n_img, cp_size)
        out = self.core_attention(q, k, v, attention_mask=None, attn_mask_type=AttnMaskType.no_mask)
        region.release(out)
        if cp_size > 1:
            out = cp.sequence_to_heads(out, n_img * cp_size, cp_size, self.head_dim)
        x_out, _ = self.linear_proj(out[:n_img])
        c_out = out[n_img:]
        if n_pad:
            c_out = F.pad(c_out, (0, 0, 0, 0, 0, n_pad))
        return x_out, c_out

    def project_context(self, c_attn: torch.Tensor) -> torch.Tensor:
        return self.context_linear_proj(c_attn)[0]


@dataclass
class MMDiTLayerSubmodules:
    joint_attention: Union[ModuleSpec, type] = None
    dual_attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


def _norm(t, eps: float):
    """The affine-free LayerNorm of adaLN (eps: ``config.layernorm_epsilon``)."""
    return F.layer_norm(t, (t.shape[-1],), eps=eps)


def _modulate(t, shift, scale, eps: float):
    return _norm(t, eps) * (1 + scale[None]) + shift[None]


class MMDiTLayer(MegatronModule):
    """One joint block. ``layer_number`` is global and 1-based (as megatron's TransformerLayer).

    ``text_output=False`` skips the text stream after attention (its output projection, MLP and
    residual): used for ``context_pre_only`` blocks and, in sd3_light with gamma = 0, for the
    last block, whose text output nothing reads.
    """

    def __init__(self, config: SD3Config, submodules: MMDiTLayerSubmodules, layer_number: int,
                 text_output: bool = True):
        super().__init__(config=config)
        self.layer_number = layer_number
        h = config.hidden_size
        self.context_pre_only = not config.block_keeps_text(layer_number)
        keeps_text = not self.context_pre_only
        self.text_output = text_output and keeps_text
        self.use_dual_attention = (layer_number - 1) in config.dual_attention_layers
        self.recompute = selective_modules(config)  # selective recomputation (recompute.py)
        # adaLN modulation stays outside FP8 and TP (as NeMo's DiT): small, replicated.
        self.adaln = nn.Linear(h, (9 if self.use_dual_attention else 6) * h)
        # context_pre_only: diffusers' AdaLayerNormContinuous (scale, shift) only.
        self.context_adaln = nn.Linear(h, (2 if self.context_pre_only else 6) * h)
        if config.zero_init_adaln:
            for lin in (self.adaln, self.context_adaln):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        # Replicated, but they modulate sequence slices under sequence parallelism.
        mark_sequence_parallel(config, self.adaln, self.context_adaln)
        self.attention = build_module(submodules.joint_attention, config=config,
                                      layer_number=layer_number, with_context=True,
                                      context_output=keeps_text)
        if self.use_dual_attention:
            self.attention2 = build_module(submodules.dual_attention, config=config,
                                           layer_number=layer_number, with_context=False)
        self.mlp = build_module(submodules.mlp, config=config)
        if keeps_text:
            self.context_mlp = build_module(submodules.mlp, config=config)
        if keeps_text and not self.text_output:
            # Kept for checkpoints and conversion, but nothing reads their output: frozen, so
            # DDP buckets never wait for a gradient and the optimizer never decays them.
            for p in [*self.context_mlp.parameters(), *self.attention.context_linear_proj.parameters()]:
                p.requires_grad_(False)

    def _mlp(self, mlp, t):
        if "mlp_act" not in self.recompute:
            out, bias = mlp(t)
            return out if bias is None else out + bias
        # selective "mlp_act": megatron's MLP (unfused, ungated) with the GELU output dropped
        # once linear_fc2 has saved it, recomputed from linear_fc1's kept output
        h, bias = mlp.linear_fc1(t)
        if bias is not None:
            h = h + bias
        region = Region(True)
        a = region(mlp.activation_func, h)
        out, bias = mlp.linear_fc2(a)
        region.release(out)
        return out if bias is None else out + bias

    def _modulated(self, regions, t, shift, scale):
        """``LN(t) * (1 + scale) + shift``; selective "layernorm" drops it after its GEMM."""
        region = Region("layernorm" in self.recompute)
        regions.append(region)
        eps = self.config.layernorm_epsilon
        return region(lambda t_, shift_, scale_: _modulate(t_, shift_, scale_, eps), t, shift, scale)

    def forward(self, x, c, y, text_len: Optional[int] = None):
        """x [S_img, B, h], c [S_txt, B, h], y [B, h] -> (x, c or None). ``text_len``: the real
        text tokens when ``c`` carries pads (see ``JointAttention.forward``)."""
        sy = F.silu(y)
        mod = self.adaln(sy).chunk(9 if self.use_dual_attention else 6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        cmod = self.context_adaln(sy)
        regions = []  # selective recompute: released once their consumer has run
        if self.context_pre_only:
            c_scale, c_shift = cmod.chunk(2, dim=-1)
            c_in = self._modulated(regions, c, c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod.chunk(6, dim=-1)
            c_in = self._modulated(regions, c, c_shift_msa, c_scale_msa)

        if "layernorm" in self.recompute:
            x_in = self._modulated(regions, x, shift_msa, scale_msa)
        else:
            x_norm = _norm(x, self.config.layernorm_epsilon)
            x_in = x_norm * (1 + scale_msa[None]) + shift_msa[None]
        x_attn, c_attn = self.attention(x_in, c_in, text_len=text_len)
        release_all(regions, x_attn)
        x_res = x
        x = x + gate_msa[None] * x_attn
        if self.use_dual_attention:
            shift2, scale2, gate2 = mod[6:]
            if "layernorm" in self.recompute:
                regions = []
                x2, _ = self.attention2(self._modulated(regions, x_res, shift2, scale2))
                release_all(regions, x2)
            else:
                x2, _ = self.attention2(x_norm * (1 + scale2[None]) + shift2[None])
            x = x + gate2[None] * x2
        x = x + gate_mlp[None] * self._modulated_mlp(self.mlp, x, shift_mlp, scale_mlp)

        if not self.text_output:
            return x, None
        c = c + c_gate_msa[None] * self.attention.project_context(c_attn)
        c = c + c_gate_mlp[None] * self._modulated_mlp(self.context_mlp, c, c_shift_mlp, c_scale_mlp)
        return x, c

    def _modulated_mlp(self, mlp, t, shift, scale):
        regions = []
        out = self._mlp(mlp, self._modulated(regions, t, shift, scale))
        release_all(regions, out)
        return out
