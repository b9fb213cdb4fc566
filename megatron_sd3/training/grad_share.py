"""How hard each loss term pulls on the joint blocks' text streams (``--log-text-grad-norms``).

At ``text_recon_gamma`` 0.5 the text-reconstruction term can be four orders of magnitude smaller
than the denoise loss, so "no effect" may say more about the term's size than about the idea.
``TextGradNorms`` measures, at each evaluation, the gradient of each enabled loss term alone on
the text-stream parameters of the joint blocks (the ``context_*`` modules: adaLN, q/k/v and
output projections, qk norms, MLP), as training weights it: ``grad_norm_text_denoise`` of
``dL_denoise``, ``grad_norm_text_recon`` of ``gamma * dL_recon``, and their ratio
``text_recon_grad_ratio`` (1: both terms pull the text stream equally hard).

Each term's gradient comes from one ``TrainStep`` of the same schedule, data-parallel reduction
and global loss normalisation as training (``TermGradStep``: the other terms are reported but not
backpropagated), on the first global batch of the validation set with training's noise, timesteps
and text dropout drawn from fixed stream positions, so successive evaluations see the same inputs.
No optimizer step is taken; the next training step zeroes the gradient buffers as always, and the
random states are restored (``evaluate.preserved_training_state``), so training is unchanged.

The norm is over the whole model: each rank sums the squares of the part of each text-stream
gradient it holds after the reduction (``compat.owned_reduced_grad``: all of it on data-parallel
rank 0 with the plain optimizer, its reduce-scattered shard of each bucket with the distributed
optimizer, as megatron-core's ``DistributedOptimizer`` owns it), counts tensor-parallel
duplicates once (megatron's ``param_is_not_tensor_parallel_duplicate``), and the squares are
summed over all ranks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from megatron_sd3.compat import owned_reduced_grad
from megatron_sd3.loss import enabled_loss_terms
from megatron_sd3.training.build import device, params_synced, unwrap
from megatron_sd3.training.step import TrainStep

TERM_KEYS = {"denoise_loss": "grad_norm_text_denoise", "text_recon_loss": "grad_norm_text_recon"}
RATIO = "text_recon_grad_ratio"


def is_text_stream(name: str) -> bool:
    """A joint block's text-stream parameter (``blocks.N.context_*`` / ``blocks.N.attention.context_*``)."""
    return name.startswith("blocks.") and ".context_" in name


class TermGradStep(TrainStep):
    """A ``TrainStep`` without optimizer whose backpropagated loss is one term (``term``)."""

    term: Optional[str] = None

    def in_loss(self, term) -> bool:
        return term.name == self.term


def text_stream_grad_sq(ddp_chunks) -> torch.Tensor:
    """This rank's sum of squares of its part of the text-stream gradients (float64, 0-d)."""
    sq = torch.zeros((), dtype=torch.float64, device=device())
    for ddp in ddp_chunks:
        for name, p in unwrap(ddp).named_parameters():
            if p.requires_grad and is_text_stream(name) and param_is_not_tensor_parallel_duplicate(p):
                sq += owned_reduced_grad(ddp, p).double().pow(2).sum()
    return sq


class TextGradNorms:
    """``measure(microbatches)`` -> ``{grad_norm_text_denoise, grad_norm_text_recon,
    text_recon_grad_ratio}`` (the recon entries only when the term is on), the same on every rank."""

    def __init__(self, cfg, ddp_chunks, *, global_batch_size: int, micro_batch_size: int, seed: int, flow):
        self.chunks = list(ddp_chunks)
        self.step = TermGradStep(cfg, ddp_chunks, None, global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size, seed=seed, flow=flow)
        self.terms = [t.name for t in enabled_loss_terms(cfg) if t.name in TERM_KEYS]

    def measure(self, microbatches) -> dict[str, float]:
        sq = []
        with params_synced(self.chunks):
            for name in self.terms:
                self.step.term = name
                self.step(microbatches, 0)
                sq.append(text_stream_grad_sq(self.chunks))
            for c in self.chunks:
                c.zero_grad_buffer()
        total = torch.stack(sq)
        dist.all_reduce(total)
        norms = {TERM_KEYS[n]: math.sqrt(v) for n, v in zip(self.terms, total.tolist())}
        if "grad_norm_text_recon" in norms:
            d = norms["grad_norm_text_denoise"]
            norms[RATIO] = norms["grad_norm_text_recon"] / d if d > 0 else float("inf")
        return norms
