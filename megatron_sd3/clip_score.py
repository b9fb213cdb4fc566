"""Text-image alignment of generated samples: CLIP score with a local CLIP model.

``CLIPScorer(model_dir)`` loads transformers' ``CLIPModel`` and ``CLIPProcessor`` from a local
folder (no hub access). ``scores(images, prompts)`` gives, per image, torchmetrics' CLIP score
``100 * max(cos(image embedding, text embedding), 0)``; ``score(...)`` the batch score as
torchmetrics' ``clip_score`` returns it, ``max(mean(100 * cos), 0)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


class ClipModelError(FileNotFoundError):
    """The CLIP model folder is missing or unreadable (one-line message)."""


class CLIPScorer:
    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
        p = Path(model_dir)
        if not (p / "config.json").is_file():
            raise ClipModelError(f"--clip-model {p}: no config.json there; give a local transformers CLIPModel "
                                 f"folder (CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:
            raise ClipModelError("the CLIP score needs transformers: pip install transformers") from None
        try:
            self.model = CLIPModel.from_pretrained(p, local_files_only=True).to(device).eval().requires_grad_(False)
            self.processor = CLIPProcessor.from_pretrained(p, local_files_only=True)
        except Exception as e:  # one line naming the path
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClipModelError(f"--clip-model {p}: cannot load a CLIPModel and CLIPProcessor ({msg})") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def cosines(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image (PIL image or uint8 ``[3, H, W]``) with its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        imgs = [im.permute(1, 2, 0).cpu().numpy() if torch.is_tensor(im) else im for im in images]
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        inp = self.processor(text=list(prompts), images=imgs, return_tensors="pt", padding=True,
                             truncation=True, max_length=max_len)
        img = _features(self.model.get_image_features(pixel_values=inp["pixel_values"].to(self.device)))
        txt = _features(self.model.get_text_features(input_ids=inp["input_ids"].to(self.device),
                                                     attention_mask=inp["attention_mask"].to(self.device)))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return (img * txt).sum(-1).float().cpu()

    def scores(self, images, prompts) -> torch.Tensor:
        """Per-image CLIP score ``100 * max(cos, 0)``."""
        return (100 * self.cosines(images, prompts)).clamp(min=0)

    def score(self, images, prompts) -> float:
        """torchmetrics' ``clip_score``: ``max(mean(100 * cos), 0)``."""
        return float((100 * self.cosines(images, prompts)).mean().clamp(min=0))


def _features(out) -> torch.Tensor:
    """transformers returns the projected features as a tensor (or, in some versions, an output
    object holding them as ``pooler_output``)."""
    if torch.is_tensor(out):
        return out
    return out.pooler_output


__all__ = ["CLIPScorer", "ClipModelError"]
