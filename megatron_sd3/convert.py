"""Weights to and from diffusers' ``SD3Transformer2DModel`` (the numerical reference).

``sd3_from_diffusers(transformer_or_path, num_layers=None)`` returns our ``SD3Model`` (single
process; a trivial process group is set up when none exists), keeping the first ``num_layers``
joint blocks when asked: that is how sd3_light is made from an SD3/SD3.5 base. The result is
called like diffusers' transformer and returns the velocity.

The mapping works on *full* (unsplit) tensors keyed by global block index:
``diffusers_to_full_state_dict`` / ``full_state_dict_to_diffusers``. ``load_full_state_dict``
puts full tensors into a model built for any TP rank and PP stage (TP slices come from the
``tensor_model_parallel`` / ``partition_dim`` attributes megatron-core sets on its parameters),
and ``gather_full_state_dict`` does the reverse on one process.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_sd3.config import PRESETS, make_config, model_fields


# -- configs -----------------------------------------------------------------------------------
def model_overrides_from_diffusers(dcfg: dict, num_layers: Optional[int] = None) -> dict[str, Any]:
    """Our model fields from a diffusers ``SD3Transformer2DModel`` config dict (text length: SD3's
    333 tokens unless overridden)."""
    base_layers = int(dcfg["num_layers"])
    n = base_layers if num_layers is None else int(num_layers)
    if not 1 <= n <= base_layers:
        raise ValueError(f"num_layers={num_layers} out of range: the diffusers model has {base_layers} blocks")
    hidden = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg.get("caption_projection_dim", hidden) != hidden:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim "
                         "(true for every SD3/SD3.5 release)")
    if dcfg.get("out_channels") not in (None, dcfg["in_channels"]):
        raise ValueError("out_channels != in_channels is not supported")
    qk = dcfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={qk!r} is not supported (only None or 'rms_norm')")
    return dict(
        num_layers=n, hidden_size=hidden, num_attention_heads=dcfg["num_attention_heads"],
        in_channels=dcfg["in_channels"], patch_size=dcfg["patch_size"],
        sample_size=dcfg["sample_size"], pos_embed_max_size=dcfg["pos_embed_max_size"],
        joint_attention_dim=dcfg["joint_attention_dim"],
        pooled_projection_dim=dcfg["pooled_projection_dim"], qk_norm=qk == "rms_norm",
        dual_attention_layers=[i for i in dcfg.get("dual_attention_layers", ()) if i < n],
        # diffusers' last block always drops the text stream; a truncated model keeps it.
        context_pre_only_last=n == base_layers,
        zero_init_adaln=False,
        text_seq_len=333,
    )


def diffusers_config(cfg) -> dict[str, Any]:
    """A diffusers ``SD3Transformer2DModel`` config for our config."""
    return dict(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.kv_channels,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_projection_dim,
        out_channels=cfg.in_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )


# -- name mapping on full tensors --------------------------------------------------------------
_TOP = {
    "pos_embed.proj": "embeddings.proj",
    "time_text_embed.timestep_embedder.linear_1": "embeddings.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2": "embeddings.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1": "embeddings.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2": "embeddings.text_embedder.linear_2",
    "context_embedder": "embeddings.context_embedder",
    "norm_out.linear": "head.norm_linear",
    "proj_out": "head.proj_out",
}
_BLOCK = {  # plain renames inside a block (weight and bias)
    "norm1.linear": "adaln",
    "norm1_context.linear": "context_adaln",
    "attn.to_out.0": "attention.linear_proj",
    "attn.to_add_out": "attention.context_linear_proj",
    "attn.norm_q": "attention.q_layernorm",
    "attn.norm_k": "attention.k_layernorm",
    "attn.norm_added_q": "attention.context_q_layernorm",
    "attn.norm_added_k": "attention.context_k_layernorm",
    "attn2.to_out.0": "attention2.linear_proj",
    "attn2.norm_q": "attention2.q_layernorm",
    "attn2.norm_k": "attention2.k_layernorm",
    "ff.net.0.proj": "mlp.linear_fc1",
    "ff.net.2": "mlp.linear_fc2",
    "ff_context.net.0.proj": "context_mlp.linear_fc1",
    "ff_context.net.2": "context_mlp.linear_fc2",
}
_QKV = {  # diffusers q/k/v triplets -> one fused, head-interleaved projection
    "attn.to_": "attention.linear_qkv",
    "attn.add_": "attention.context_linear_qkv",
    "attn2.to_": "attention2.linear_qkv",
}


def _fuse_qkv(q, k, v, heads):
    """[h_out, ...] x3 -> rows ordered [head, (q, k, v), head_dim] (a TP split keeps whole heads)."""
    d = q.shape[0] // heads
    return torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(
        3 * q.shape[0], *q.shape[1:])


def _split_qkv(t, heads):
    d = t.shape[0] // (3 * heads)
    parts = t.reshape(heads, 3, d, *t.shape[1:]).unbind(1)
    return [p.reshape(heads * d, *t.shape[1:]) for p in parts]


def diffusers_to_full_state_dict(dsd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """diffusers state dict -> our full state dict (blocks ``>= cfg.num_layers`` are dropped)."""
    out, used = {}, set()
    heads = cfg.num_attention_heads
    for dname, ours in _TOP.items():
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = dsd[f"{dname}.{suffix}"]
            used.add(f"{dname}.{suffix}")
    for i in range(cfg.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for dname, ours in _BLOCK.items():
            for suffix in ("weight", "bias"):
                key = f"{src}{dname}.{suffix}"
                if key in dsd:
                    out[f"{dst}{ours}.{suffix}"] = dsd[key]
                    used.add(key)
        for dpre, ours in _QKV.items():
            for suffix in ("weight", "bias"):
                keys = [f"{src}{dpre}{x}.{suffix}" for x in ("q", "k", "v")]
                if dpre == "attn.add_":
                    keys = [f"{src}attn.add_{x}_proj.{suffix}" for x in ("q", "k", "v")]
                if all(k in dsd for k in keys):
                    out[f"{dst}{ours}.{suffix}"] = _fuse_qkv(*(dsd[k] for k in keys), heads)
                    used.update(keys)
    dropped = [k for k in dsd if k not in used and k != "pos_embed.pos_embed"
               and not _is_dropped_block(k, cfg.num_layers)]
    if dropped:
        raise ValueError(f"diffusers weights not understood by the mapping: {dropped[:5]}...")
    return out


def _is_dropped_block(key: str, num_layers: int) -> bool:
    m = re.match(r"transformer_blocks\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= num_layers


def full_state_dict_to_diffusers(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our full state dict -> a diffusers state dict (``pos_embed.pos_embed`` included).

    diffusers' last block always drops the text stream (``context_pre_only``). When ours keeps it
    (sd3_light), its text output feeds only the reconstruction loss, so the export drops the text
    output projection and MLP and keeps, of the text modulation, the (shift, scale) that
    modulates the text going into attention, reordered as diffusers' ``AdaLayerNormContinuous``
    (scale, shift): the exported transformer computes the same velocity.
    """
    from megatron_sd3.models.embeddings import sincos_2d_table

    if not cfg.context_pre_only_last:
        last = f"blocks.{cfg.num_layers - 1}."
        sd = {k: v for k, v in sd.items() if not k.startswith(
            (last + "attention.context_linear_proj.", last + "context_mlp."))}
        for suffix in ("weight", "bias"):
            shift, scale = sd[f"{last}context_adaln.{suffix}"].chunk(6, dim=0)[:2]
            sd[f"{last}context_adaln.{suffix}"] = torch.cat([scale, shift], dim=0)

    rev_top = {v: k for k, v in _TOP.items()}
    rev_block = {v: k for k, v in _BLOCK.items()}
    rev_qkv = {v: k for k, v in _QKV.items()}
    out = {}
    for key, t in sd.items():
        name, suffix = key.rsplit(".", 1)
        m = re.match(r"blocks\.(\d+)\.(.*)", name)
        if not m:
            out[f"{rev_top[name]}.{suffix}"] = t
            continue
        i, inner = m.groups()
        pre = f"transformer_blocks.{i}."
        if inner in rev_block:
            out[f"{pre}{rev_block[inner]}.{suffix}"] = t
        elif inner in rev_qkv:
            dpre = rev_qkv[inner]
            for x, part in zip("qkv", _split_qkv(t, cfg.num_attention_heads)):
                dname = f"attn.add_{x}_proj" if dpre == "attn.add_" else f"{dpre}{x}"
                out[f"{pre}{dname}.{suffix}"] = part
        else:
            raise KeyError(f"no diffusers name for '{key}'")
    table = sincos_2d_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    out["pos_embed.pos_embed"] = table.unsqueeze(0)
    return out


# -- full tensors <-> a (possibly TP/PP-split) model ----------------------------------------------
def _tp_rank_size():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _local_name(model, name: str) -> str:
    """Parameter name of the model -> full name (local block index -> global)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if not m:
        return name
    return f"blocks.{model.blocks[int(m.group(1))].layer_number - 1}.{m.group(2)}"


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into this rank's part of ``model`` (strict: every parameter is set)."""
    rank, size = _tp_rank_size()
    missing = []
    for name, p in model.named_parameters():
        key = _local_name(model, name)
        if key not in full:
            missing.append(key)
            continue
        t = full[key]
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            t = t.chunk(size, dim=p.partition_dim)[rank]
        if t.shape != p.shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
    if missing:
        raise ValueError(f"weights missing for {len(missing)} parameters, e.g. {missing[:3]}")


@torch.no_grad()
def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's parameters as full tensors (all-gathered over TP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _, size = _tp_rank_size()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=p.partition_dim)
        out[_local_name(model, name)] = t.clone()
    return out


# -- the user-facing entry points ----------------------------------------------------------------
def ensure_single_process_parallel_state() -> None:
    """A trivial process group + megatron parallel state, when none exists (conversion, tests)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        return
    from megatron_sd3.distributed import initialize_distributed

    initialize_distributed(1, 1)


def _load_diffusers_transformer(transformer_or_path):
    if isinstance(transformer_or_path, (str, Path)):
        path = Path(transformer_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"diffusers transformer directory not found: {path}")
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(path)
    return transformer_or_path


def sd3_from_diffusers(transformer, num_layers: Optional[int] = None, **config_overrides):
    """A diffusers ``SD3Transformer2DModel`` (or a ``save_pretrained`` directory) -> ``SD3Model``."""
    from megatron_sd3.models.sd3_model import SD3Model

    transformer = _load_diffusers_transformer(transformer)
    ensure_single_process_parallel_state()
    overrides = model_overrides_from_diffusers(dict(transformer.config), num_layers)
    overrides.update(config_overrides)
    dtype = next(transformer.parameters()).dtype
    cfg = make_config("tiny", parallel={"params_dtype": dtype}, **overrides)
    model = SD3Model(cfg)
    load_full_state_dict(model, diffusers_to_full_state_dict(transformer.state_dict(), cfg))
    return model


def sd3_to_diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """Our (single-process) model -> a diffusers state dict that loads strictly."""
    return full_state_dict_to_diffusers(gather_full_state_dict(model), model.config)


__all__ = [
    "sd3_from_diffusers", "sd3_to_diffusers_state_dict", "diffusers_to_full_state_dict",
    "full_state_dict_to_diffusers", "load_full_state_dict", "gather_full_state_dict",
    "model_overrides_from_diffusers", "diffusers_config", "PRESETS", "model_fields",
]
