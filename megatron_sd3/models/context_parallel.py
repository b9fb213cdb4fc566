"""Context parallelism (``--context-parallel-size``, megatron-core's ``config.context_parallel_size``):
the image tokens of each sample split over the context-parallel ranks, attention by an
all-to-all over heads (Ulysses). ``docs/design.md``, section "Context parallelism".

The CP ranks of a data-parallel rank hold parts of the same samples: every CP rank holds one
contiguous chunk of ``S_img / CP`` image tokens and the whole text stream (the joint attention
needs all of it on every rank). Everything outside the attention (adaLN, MLP, norms, the head)
works on the local chunk. Around the attention kernel (``JointAttention.forward``):

* :func:`heads_to_sequence` (:func:`qkv_heads_to_sequence`: q, k and v in one all-to-all): the
  image part of q, k, v goes from ``[S_img/CP, b, h, d]`` to
  ``[S_img, b, h/CP, d]`` by megatron's ``all_to_all`` over the CP group (rank ``r`` gets the
  ``r``-th group of the heads, the chunks in rank order); the text part, whole on every rank, is
  sliced to the same heads without communication;
* :func:`sequence_to_heads`: the inverse all-to-all for the image part of the output; the text
  part is all-gathered over the heads (its backward reduce-scatters, see below).

Gradients. Every parameter is replicated over CP, and megatron's DDP sums the gradients over
data parallel x context parallel (``calculate_per_token_loss``: no averaging), so each CP rank must
contribute its *share* of every gradient and the shares must add up to the one-process gradient:

* image chunks are owned by one rank each: their gradients are that rank's alone; the first
  stage's embeddings run on the whole image and :func:`chunk` keeps the local part (a plain slice:
  the other chunks get a zero gradient on this rank);
* the text stream is replicated, but each rank's gradient into it is a partial sum: the
  attention of rank ``r`` reaches the text only through its heads (a plain slice again), and the
  text output's all-gather over heads reduce-scatters its gradient (the sum of the ranks' shares);
* the loss terms are computed on every CP rank from the same values: the velocity is
  all-gathered after the head's projection with a split backward (:func:`gather_image`: each rank
  keeps the gradient of its own chunk), and the text-reconstruction term's gradient enters the
  replicated text stream scaled by ``1/CP`` (:func:`text_loss_share`), so the CP ranks' shares
  add up to it once. The reported losses are therefore reduced over data parallel only (each CP
  rank holds the whole value), and CP ranks are not counted as more samples.

Image token counts must divide by CP (and by TP x CP with sequence parallelism, which slices each
chunk again over TP); a latent bucket that does not is refused in one line before any work
starts (:func:`check_image_tokens`). Heads must divide by TP x CP.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import all_to_all, gather_from_sequence_parallel_region

from megatron_sd3.config import ConfigError


def size(config) -> int:
    """How many ranks split the image tokens (1 when context parallelism is off)."""
    return int(getattr(config, "context_parallel_size", 1) or 1)


def check_image_tokens(config, n_img: int) -> None:
    """One line (a ``ConfigError``) when the image tokens do not split evenly into CP chunks
    (TP x CP with sequence parallelism)."""
    cp = size(config)
    if cp == 1:
        return
    sp = config.tensor_model_parallel_size if getattr(config, "sequence_parallel", False) else 1
    if n_img % (cp * sp):
        what = f"context-parallel-size {cp}" + (f" x tensor-model-parallel-size {sp}" if sp > 1 else "")
        raise ConfigError(
            f"--context-parallel-size splits the {n_img} image tokens of a latent bucket over {what} = "
            f"{cp * sp} ranks, which does not divide them; use latent sizes whose patch count "
            f"(H/{config.patch_size} x W/{config.patch_size}) is a multiple of {cp * sp}, or another "
            f"--context-parallel-size")


def chunk(config, x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous chunk ``[S/CP, B, h]`` of the whole image stream ``[S, B, h]``
    (a slice: the gradient of the other chunks is zero here, they are other ranks' share),
    copied, so that the whole stream is freed once the embeddings are done with it (a view would
    keep all of it alive for the first block's backward)."""
    cp = size(config)
    if cp == 1:
        return x
    n = x.shape[0] // cp
    r = ps.get_context_parallel_rank()
    return x[r * n:(r + 1) * n].clone()


def gather_image(config, t: torch.Tensor) -> torch.Tensor:
    """The CP chunks ``[S/CP, ...]`` -> the whole ``[S, ...]`` on every CP rank, for computation
    replicated over CP (the loss); backward: each rank keeps its chunk's gradient, no reduction."""
    if size(config) == 1:
        return t
    return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False,
                                                group=ps.get_context_parallel_group())


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor: float):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def text_loss_share(config, t: torch.Tensor) -> torch.Tensor:
    """The replicated text output as a loss computed on every CP rank sees it: identity forward,
    gradient scaled by ``1/CP`` (each rank's share of the one-process gradient)."""
    cp = size(config)
    return t if cp == 1 else _ScaleGrad.apply(t, 1.0 / cp)


def _heads_group(t: torch.Tensor, cp: int) -> torch.Tensor:
    """``[s, b, h, d]`` -> this CP rank's heads ``[s, b, h/CP, d]`` (a slice)."""
    hc = t.shape[2] // cp
    r = ps.get_context_parallel_rank()
    return t[:, :, r * hc:(r + 1) * hc]


def heads_to_sequence(t: torch.Tensor, n_img_local: int, cp: int) -> torch.Tensor:
    """Joint q, k or v ``[S_img/CP + S_txt, b, h, d]`` (this rank's image chunk, then the whole
    text) -> ``[S_img + S_txt, b, h/CP, d]``: every image token and the text, for this rank's
    heads."""
    img, txt = t[:n_img_local], t[n_img_local:]
    s, b, h, d = img.shape
    # heads group j of the local chunk goes to rank j; chunk i received comes from rank i
    img = img.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4).reshape(cp * s, b, h // cp, d)
    img = all_to_all(ps.get_context_parallel_group(), img)
    if txt.shape[0] == 0:
        return img
    return torch.cat([img, _heads_group(txt, cp)], dim=0)


def qkv_heads_to_sequence(q, k, v, n_img_local: int, cp: int):
    """:func:`heads_to_sequence` of q, k and v in one all-to-all (packed along the head
    dimension: a third of the collectives)."""
    d = q.shape[-1]
    return heads_to_sequence(torch.cat([q, k, v], dim=-1), n_img_local, cp).split(d, dim=-1)


def sequence_to_heads(out: torch.Tensor, n_img: int, cp: int, head_dim: int) -> torch.Tensor:
    """Attention output ``[S_img + S_txt, b, h/CP * d]`` -> ``[S_img/CP + S_txt, b, h * d]``:
    this rank's image chunk for every head (the inverse all-to-all) and the whole text for every
    head (an all-gather over the heads whose backward reduce-scatters the ranks' gradient shares)."""
    s_tot, b, _ = out.shape
    hc = out.shape[2] // head_dim
    group = ps.get_context_parallel_group()
    img = all_to_all(group, out[:n_img].reshape(n_img, b, hc, head_dim).contiguous())
    n = n_img // cp
    img = img.reshape(cp, n, b, hc, head_dim).permute(1, 2, 0, 3, 4).reshape(n, b, cp * hc * head_dim)
    txt = out[n_img:]
    if txt.shape[0] == 0:
        return img
    s_txt = txt.shape[0]
    heads_first = txt.reshape(s_txt, b, hc, head_dim).permute(2, 0, 1, 3).contiguous()  # [hc, s, b, d]
    full = gather_from_sequence_parallel_region(heads_first, tensor_parallel_output_grad=True, group=group)
    txt = full.permute(1, 2, 0, 3).reshape(s_txt, b, cp * hc * head_dim)
    return torch.cat([img, txt], dim=0)
