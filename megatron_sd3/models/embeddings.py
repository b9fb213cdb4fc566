"""First-stage embeddings and last-stage output head of the MMDiT (pre_process / post_process).

Numerically these follow diffusers' ``SD3Transformer2DModel`` (``PatchEmbed`` with the cropped
2D sin-cos table, ``CombinedTimestepTextProjEmbeddings``, ``context_embedder``,
``AdaLayerNormContinuous`` + ``proj_out``). They are small and replicated on every TP rank; the
parameter names mirror diffusers' so the weight mapping in ``convert.py`` stays readable.
Tensors leave in megatron's ``[seq, batch, hidden]`` layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_table(embed_dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """The ``[grid_size**2, embed_dim]`` sin-cos table of diffusers' ``get_2d_sincos_pos_embed``."""
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    emb_h = sincos_1d(embed_dim // 2, grid_w)  # diffusers: first half from the "w-first" grid
    emb_w = sincos_1d(embed_dim // 2, grid_h)
    return torch.cat([emb_h, emb_w], dim=1).float()


def timestep_sinusoid(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features (flip_sin_to_cos=True, downscale_freq_shift=0), as SD3."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class SD3Embeddings(nn.Module):
    """Latents, text tokens, timestep and pooled text -> (x [S_img,B,h], c [S_txt,B,h], y [B,h])."""

    def __init__(self, config):
        super().__init__()
        h, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.pos_embed_max_size = config.pos_embed_max_size
        self.proj = nn.Conv2d(config.in_channels, h, kernel_size=p, stride=p)
        table = sincos_2d_table(h, config.pos_embed_max_size, config.sample_size // p)
        # Deterministic from the config: not part of the checkpoint.
        self.register_buffer("pos_table", table, persistent=False)
        self.timestep_embedder = MLPEmbedder(256, h)
        self.text_embedder = MLPEmbedder(config.pooled_projection_dim, h)
        self.context_embedder = nn.Linear(config.joint_attention_dim, h)

    def cropped_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        m = self.pos_embed_max_size
        if gh > m or gw > m:
            raise ValueError(
                f"latent of {gh}x{gw} patches exceeds pos_embed_max_size={m} "
                f"(max latent side {m * self.patch_size}); use a smaller resolution")
        top, left = (m - gh) // 2, (m - gw) // 2
        t = self.pos_table.view(m, m, -1)[top: top + gh, left: left + gw]
        return t.reshape(gh * gw, -1)

    def forward(self, latents, prompt_embeds, pooled, timesteps):
        b, _, hh, ww = latents.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of patch_size={p}")
        x = self.proj(latents).flatten(2).transpose(1, 2)  # [B, S_img, h]
        x = x + self.cropped_pos_embed(hh // p, ww // p).to(x.dtype)
        t_feat = timestep_sinusoid(timesteps).to(pooled.dtype)
        y = self.timestep_embedder(t_feat) + self.text_embedder(pooled)
        c = self.context_embedder(prompt_embeds)
        return x.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous(), y


class SD3OutputHead(nn.Module):
    """adaLN-continuous norm, linear to patches, unpatchify -> velocity [B, C, H, W]."""

    def __init__(self, config):
        super().__init__()
        h, p = config.hidden_size, config.patch_size
        self.patch_size, self.out_channels = p, config.in_channels
        self.eps = config.layernorm_epsilon
        self.norm_linear = nn.Linear(h, 2 * h)  # diffusers: norm_out.linear (scale, shift)
        self.proj_out = nn.Linear(h, p * p * config.in_channels)
        if config.zero_init_adaln:
            for lin in (self.norm_linear, self.proj_out):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x, y, latent_hw=None):
        """x: [S_img, B, h]; y: [B, h]; latent_hw: (H, W) of the latent -> velocity [B, C, H, W].
        Without ``latent_hw``: the patches ``[S, B, p*p*C]`` of any run of image tokens (a
        context-parallel chunk), for :meth:`unpatchify` once the chunks are gathered."""
        scale, shift = self.norm_linear(F.silu(y)).chunk(2, dim=-1)
        x = F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale[None]) + shift[None]
        x = self.proj_out(x)
        return x if latent_hw is None else self.unpatchify(x, latent_hw)

    def unpatchify(self, x, latent_hw):
        """[S_img, B, p*p*C] -> velocity [B, C, H, W]."""
        x = x.transpose(0, 1)  # [B, S_img, p*p*C]
        p, c = self.patch_size, self.out_channels
        gh, gw = latent_hw[0] // p, latent_hw[1] // p
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)
