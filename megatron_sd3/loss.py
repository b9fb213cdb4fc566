"""The training loss: denoise (MSE or pseudo-Huber, optional mask) + gamma * text reconstruction.

Each term is computed as a (sum, weight) pair so that the same code serves two normalisations:

* local means (``combine_local``): what the seed's ``LightSD3Pipeline.get_loss_fn`` returns;
* global means over the whole global batch (``megatron_loss_func`` in ``training/step.py``),
  exact across data-parallel ranks whose masks differ.

Denoise loss elementwise: ``d = pred - target``; MSE ``d**2``, pseudo-Huber ``sqrt(d**2 + c**2) - c``.
A mask (empty tensor = none) of shape ``[B, H, W]`` / ``[B, 1, H, W]`` (broadcast over
channels) or the prediction's own shape weights elements; the masked mean divides by the mask's
weight (summed over the broadcast shape). Text reconstruction: per-token MSE over every element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def elementwise_denoise(pred: torch.Tensor, target: torch.Tensor,
                        pseudo_huber_c: Optional[float] = None) -> torch.Tensor:
    d = pred.float() - target.float()
    if pseudo_huber_c is None:
        return d * d
    c = float(pseudo_huber_c)
    return torch.sqrt(d * d + c * c) - c


def expand_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Mask broadcast to ``like``'s shape; None for an absent or empty mask."""
    if mask is None or mask.numel() == 0:
        return None
    m = mask.float()
    if m.dim() == like.dim() - 1 and like.dim() >= 3:  # [B, H, W] -> [B, 1, H, W]
        m = m.unsqueeze(1)
    try:
        return m.expand_as(like)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the prediction "
                         f"{tuple(like.shape)}; give [B, H, W], [B, 1, H, W] or the full shape") from None


def denoise_terms(pred, target, mask=None, pseudo_huber_c=None):
    """(sum of weighted elementwise loss, total weight)."""
    err = elementwise_denoise(pred, target, pseudo_huber_c)
    m = expand_mask(mask, err)
    if m is None:
        return err.sum(), torch.tensor(float(err.numel()), device=err.device)
    return (err * m).sum(), m.sum()


def text_recon_terms(final_tokens, target_tokens):
    """(sum of squared error, element count) of the text reconstruction; the target is detached."""
    d = final_tokens.float() - target_tokens.detach().float()
    return (d * d).sum(), torch.tensor(float(d.numel()), device=d.device)


@dataclass
class LossBreakdown:
    total: torch.Tensor
    denoise: torch.Tensor
    text_recon: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "denoise_loss": float(self.denoise.detach()),
                "text_recon_loss": float(self.text_recon.detach())}


def split_output(output):
    """Model output -> (pred, final_tokens or None, target_tokens or None)."""
    if isinstance(output, (tuple, list)):
        if len(output) != 3:
            raise ValueError("with text reconstruction the model output is (pred, final_tokens, target_tokens)")
        return output
    return output, None, None


def combine_local(output, target, mask=None, gamma: float = 0.0,
                  pseudo_huber_c: Optional[float] = None) -> LossBreakdown:
    """``denoise + gamma * text_recon`` with local means (the seed's loss)."""
    pred, final_tokens, target_tokens = split_output(output)
    s, w = denoise_terms(pred, target, mask, pseudo_huber_c)
    denoise = s / w.clamp(min=1e-12)
    text = torch.zeros((), device=denoise.device)
    if gamma > 0 and final_tokens is not None and target_tokens is not None and target_tokens.numel() > 0:
        ts, tn = text_recon_terms(final_tokens, target_tokens)
        text = ts / tn
    return LossBreakdown(total=denoise + gamma * text, denoise=denoise, text_recon=text)
