"""The one tensor that travels between pipeline stages (``docs/design.md``, section "Activation packing").

Megatron-core's schedules send one ``[seq, micro_batch, hidden]`` tensor of a declared shape per
microbatch. Everything a later stage needs travels in it, in this order along ``seq``:

    [ image tokens (S_img) | text tokens (S_txt) | recon target (S_txt, only when gamma > 0) | y (1) ]

``y`` (timestep + pooled conditioning) is one extra token so that its gradient flows back to the
first stage's embedders. With context parallelism each rank sends its chunk of the image tokens
and the whole text (and target). With sequence parallelism (``sp`` = TP ranks) each rank sends its own
slice of each stream and the replicated ``y``: ``seq_len / sp`` tokens per rank, which is what
megatron's schedules derive from ``seq_len`` (``models/sequence_parallel.py``); the reconstruction target is detached where it is captured, so no
gradient flows into it. With gamma = 0 the target slot does not exist: not one byte more than the
plain model. This module is the only place that knows the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ActivationLayout:
    n_img: int
    """Image tokens (latent patches)."""
    n_txt: int
    """Text tokens as they travel (padded length when the text stream is padded)."""
    carry_target: bool
    """Whether the text-reconstruction target travels (gamma > 0)."""
    sp: int = 1
    """Ranks the streams are split over (sequence parallelism; 1 = off). ``n_img`` and ``n_txt``
    count the whole streams and must be multiples of ``sp``."""
    cp: int = 1
    """Context-parallel ranks the image stream is split over (1 = off): each holds a chunk of
    ``n_img / cp`` image tokens (sliced again over ``sp``) and the whole text stream."""

    @classmethod
    def of(cls, config, latent_hw, text_len: Optional[int] = None) -> "ActivationLayout":
        """The layout of a model of ``config`` for latents of ``latent_hw`` and ``text_len`` text
        tokens (default: the declared ``text_seq_len``, what pipeline stages agree on); a stream
        that does not split over the SP / CP ranks is one ``ConfigError`` line."""
        from megatron_sd3.models import context_parallel as cp
        from megatron_sd3.models import sequence_parallel as sp

        n_img = config.num_image_tokens(*latent_hw)
        sp.check_image_tokens(config, n_img)
        cp.check_image_tokens(config, n_img)
        padded = config.padded_text(config.text_seq_len if text_len is None else text_len)
        return cls(n_img=n_img, n_txt=sp.text_len(config, padded), carry_target=config.text_recon,
                   sp=sp.size(config), cp=cp.size(config))

    @property
    def n_img_local(self) -> int:
        """Image tokens in one rank's message."""
        return self.n_img // (self.cp * self.sp)

    @property
    def local_len(self) -> int:
        """Tokens of one rank's message: its slice of each stream, and ``y``."""
        return self.n_img_local + (self.n_txt * (2 if self.carry_target else 1)) // self.sp + 1

    @property
    def seq_len(self) -> int:
        """The sequence length megatron is told (``config.seq_length``; megatron's p2p shape is
        ``seq_len // cp // sp`` = :attr:`local_len`)."""
        return self.local_len * self.sp * self.cp

    def bytes_per_message(self, micro_batch: int, hidden: int, dtype: torch.dtype) -> int:
        """Bytes one rank sends per microbatch."""
        return self.local_len * micro_batch * hidden * torch.tensor([], dtype=dtype).element_size()

    def pack(self, x: torch.Tensor, c: torch.Tensor, target: Optional[torch.Tensor],
             y: torch.Tensor) -> torch.Tensor:
        """x [S_img,B,h], c [S_txt,B,h], target [S_txt,B,h] or None, y [B,h] -> [seq,B,h]
        (with ``sp`` or ``cp`` > 1: this rank's parts of x, c, target -> [local_len,B,h])."""
        parts = [x, c]
        if self.carry_target:
            if target is None:  # the target block is on a later stage: an empty slot until then
                target = torch.zeros_like(c)
            parts.append(target.detach())
        parts.append(y.unsqueeze(0))
        out = torch.cat(parts, dim=0)
        assert out.shape[0] == self.local_len, (out.shape, self)
        return out

    def unpack(self, t: torch.Tensor):
        """[seq,B,h] -> (x, c, target or None, y)."""
        if t.shape[0] != self.local_len:
            raise ValueError(f"pipeline activation has {t.shape[0]} tokens, layout expects {self.local_len} "
                             f"({self}); all stages must agree on image size, text length and gamma")
        n_img, n_txt = self.n_img_local, self.n_txt // self.sp
        i, j = n_img, n_img + n_txt
        x, c = t[:i], t[i:j]
        target = None
        if self.carry_target:
            target = t[j: j + n_txt].detach()
            j += n_txt
        return x, c, target, t[j]
