"""Layer spec of the MMDiT joint block: one spec, filled by a backend.

The spec names roles (column/row-parallel linear, qk-norm, core attention); the chosen backend's
megatron-core ``BackendSpecProvider`` fills them (``megatron_sd3.backends``: ``local``,
``torchao``, ``transformer_engine``). Optional submodules follow megatron-core's idiom: with
qk-norm off the q/k norms are ``IdentityOp`` in the spec, not a branch in the module.
"""
from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sd3.backends import backend_for
from megatron_sd3.backends.transformer_engine import transformer_engine_available  # noqa: F401
from megatron_sd3.models.mmdit_layer import (
    JointAttention,
    JointAttentionSubmodules,
    MMDiTLayer,
    MMDiTLayerSubmodules,
)


def get_mmdit_layer_spec(transformer_impl: str = "local", qk_norm: bool = True,
                         fp8: bool = False) -> ModuleSpec:
    """The joint block's ``ModuleSpec`` for ``--transformer-impl`` (FP8 on or off)."""
    backend = backend_for(transformer_impl, fp8)
    backend.check(None)  # availability (TE installed, torchao installed)
    provider = backend.spec_provider()
    norm = provider.layer_norm(rms_norm=True, for_qk=True) if qk_norm else IdentityOp
    attention = JointAttentionSubmodules(
        linear_qkv=provider.column_parallel_linear(),
        linear_proj=provider.row_parallel_linear(),
        core_attention=provider.core_attention(),
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
                submodules=MLPSubmodules(linear_fc1=provider.column_parallel_linear(),
                                         linear_fc2=provider.row_parallel_linear()),
            ),
        ),
    )
