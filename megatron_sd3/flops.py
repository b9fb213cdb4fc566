"""MMDiT FLOP count, device peak table and MFU: the training log's TFLOP/s and the benchmark's.

FLOP count (``model_flops_per_sample``)
---------------------------------------
``model_flops_per_sample(cfg, latent_hw)`` is the one count both the training log
(``pretrain.py``) and ``tools/bench_throughput.py`` report: the joint blocks, the embedders and
the output head of a model config at a latent size, for a training step, with the *unpadded*
text length (FP8's pad tokens get no credit). It is ``mmdit_flops_per_sample(...,
include_io=True)`` with the config's fields.

Forward FLOPs = 2 x multiply-accumulates, GEMMs only (norms, activations, softmax, RoPE-free
position adds and the losses are elementwise and left out, as in the usual MFU convention).
With hidden ``h``, MLP width ``f``, ``I`` image tokens, ``T`` text tokens and ``S = I + T``,
one joint block costs

    per token of each stream:   2 * (3h^2 [qkv] + h^2 [out proj] + 2*h*f [MLP])
    per sample, each stream:    2 * 6h^2          [adaLN modulation on the conditioning vector]
    joint attention:            2 * 2 * S^2 * h   [Q K^T and P V over the concatenated sequence]

    block = 2*(4h^2 + 2hf)*(I + T) + 2*2*6h^2 + 4*S^2*h

A dual-attention block (SD3.5's MMDiT-X) adds an image-only attention and 3 more modulation
chunks on the image stream (9 instead of 6):

    dual  = 2*(4h^2)*I + 4*I^2*h + 2*3h^2

``context_pre_only_last`` (SD3's last block drops the text stream): the last block's text
stream then has no output projection and no MLP, and only 2 modulation chunks:
``- 2*(h^2 + 2hf)*T - 2*4h^2``. sd3_light keeps the text stream in its last block (default).

``text_recon`` (the text reconstruction loss): the loss itself is an elementwise MSE on a
detached activation, but it is the only reader of the last block's text output. With it off
(and a last block that keeps its text stream, as sd3_light) the model skips that block's text
output projection and MLP, ``- 2*(h^2 + 2hf)*T``; with it on they run. So recon on costs
exactly those GEMMs (about 1/(2 * num_layers) of the blocks' token GEMMs).

``include_io`` adds the embedders and the output head (small next to the blocks at 1024 px):
patch embedding ``2*I*(p^2*C)*h``, context embedder ``2*T*txt_width*h``, timestep and pooled
MLPs ``2*(freq_dim*h + h^2 + pooled_width*h + h^2)``, final modulation ``2*2h^2`` and final
linear ``2*I*h*(p^2*C)``.

Training step = 3 x forward (backward = grad-input + grad-weight GEMMs = 2 x forward); with
activation recomputation the hardware does more, but MFU counts model FLOPs only.

Peaks (``PEAK_TFLOPS``) are dense (no 2:4 sparsity) tensor-core TFLOP/s from NVIDIA's data
sheets; ``None`` where the format does not exist on the card (A100 has no FP8).
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "model_flops_per_sample",
    "mmdit_flops_per_sample",
    "mmdit_io_flops_per_sample",
    "PEAK_TFLOPS",
    "peak_tflops",
    "device_key",
    "mfu",
]


def mmdit_io_flops_per_sample(
    hidden: int,
    img_tokens: int,
    txt_tokens: int,
    patch_size: int = 2,
    in_channels: int = 16,
    txt_width: int = 4096,
    pooled_width: int = 2048,
    freq_dim: int = 256,
) -> int:
    """Forward FLOPs of the embedders and the output head (see the module docstring)."""
    h = hidden
    pc = patch_size * patch_size * in_channels
    patch_embed = 2 * img_tokens * pc * h
    context_embed = 2 * txt_tokens * txt_width * h
    cond = 2 * (freq_dim * h + h * h + pooled_width * h + h * h)
    final = 2 * 2 * h * h + 2 * img_tokens * h * pc
    return patch_embed + context_embed + cond + final


def mmdit_flops_per_sample(
    num_layers: int,
    hidden: int,
    ffn_hidden: int,
    img_tokens: int,
    txt_tokens: int,
    dual_attention_layers: int = 0,
    text_recon: bool = False,
    *,
    context_pre_only_last: bool = False,
    training: bool = False,
    include_io: bool = False,
    **io_kwargs,
) -> int:
    """GEMM FLOPs of one sample through ``num_layers`` MMDiT joint blocks (forward, or a
    training step = 3 x forward with ``training=True``). Formula in the module docstring."""
    h, f, i, t = hidden, ffn_hidden, img_tokens, txt_tokens
    s = i + t
    per_token = 2 * (3 * h * h + h * h + 2 * h * f)
    block = per_token * s + 2 * 2 * (6 * h * h) + 2 * 2 * s * s * h
    total = num_layers * block
    total += dual_attention_layers * (2 * (4 * h * h) * i + 2 * 2 * i * i * h + 2 * 3 * h * h)
    if context_pre_only_last and num_layers > 0:
        total -= 2 * (h * h + 2 * h * f) * t + 2 * 4 * h * h
    elif not text_recon and num_layers > 0:
        total -= 2 * (h * h + 2 * h * f) * t  # nothing reads the last block's text output
    if include_io:
        total += mmdit_io_flops_per_sample(h, i, t, **io_kwargs)
    return 3 * total if training else total


def model_flops_per_sample(cfg, latent_hw, training: bool = True) -> int:
    """GEMM FLOPs of one sample of latent size ``latent_hw`` (h, w) through the model of ``cfg``
    (an ``SD3Config``): joint blocks, embedders and head; a training step (fwd + bwd) by default."""
    h, w = latent_hw
    return mmdit_flops_per_sample(
        cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_image_tokens(h, w), cfg.text_seq_len,
        dual_attention_layers=len(cfg.dual_attention_layers), text_recon=cfg.text_recon,
        context_pre_only_last=cfg.context_pre_only_last, training=training, include_io=True,
        patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        txt_width=cfg.joint_attention_dim, pooled_width=cfg.pooled_projection_dim)


# Dense tensor-core peaks, TFLOP/s (NVIDIA data sheets; sparsity figures halved).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.5, "fp8": 1979.0},  # H100 SXM5
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"bf16": 835.5, "fp8": 1671.0},
    "H200": {"bf16": 989.5, "fp8": 1979.0},  # H200 SXM: same tensor cores as H100 SXM
    "A100": {"bf16": 312.0, "fp8": None},  # Ampere: no FP8 tensor cores
    "B200": {"bf16": 2250.0, "fp8": 4500.0},  # HGX B200
}


def device_key(device_name: str) -> Optional[str]:
    """Map ``torch.cuda.get_device_name()`` (e.g. 'NVIDIA H100 80GB HBM3') to a table key."""
    n = device_name.upper()
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        if "NVL" in n:
            return "H100 NVL"
        return "H100"
    for key in ("H200", "B200", "A100"):
        if key in n:
            return key
    return None


def peak_tflops(device_name: str, dtype: str = "bf16") -> Optional[float]:
    """Dense peak TFLOP/s for a device name and 'bf16'/'fp8'; None if unknown (e.g. CPU)."""
    key = device_key(device_name)
    if key is None:
        return None
    if dtype not in ("bf16", "fp8"):
        raise ValueError(f"dtype must be 'bf16' or 'fp8', got {dtype!r}")
    return PEAK_TFLOPS[key][dtype]


def mfu(achieved_flops_per_s: float, device_name: str, dtype: str = "bf16") -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak for ``dtype``
    (None when the peak is unknown). Convention: FP8 runs are reported against the FP8 peak and,
    for comparability, also against the bf16 peak by the caller if wanted."""
    peak = peak_tflops(device_name, dtype)
    if not peak:
        return None
    return achieved_flops_per_s / (peak * 1e12)
