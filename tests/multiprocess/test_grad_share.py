"""--log-text-grad-norms (megatron_sd3/training/grad_share.py): each loss term's gradient norm on
the joint blocks' text streams, per evaluation. One process here: the two terms' gradients add up
to training's gradient, the recon norm carries gamma, the figures are the main_grad norms of the
text-stream parameters only. Layouts (PP, TP, DP with the distributed optimizer) are compared in
test_evaluate.py; that training is unchanged by it, too."""
import math

import pytest
import torch

from _bounds import BOUND


def _text_grads(built):
    from megatron_sd3.training.grad_share import is_text_stream

    return {n: p.main_grad.detach().clone() for n, p in built.models[0].named_parameters()
            if p.requires_grad and is_text_stream(n)}


def test_term_gradients_on_the_text_streams(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.flow_matching import FlowMatchingConfig
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.evaluate import Evaluator, ValidationSet, eval_log_line
    from megatron_sd3.training.grad_share import TermGradStep, is_text_stream
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", text_recon_gamma=0.5, zero_init_adaln=False)
    built = build_training(cfg, optimizer=dict(lr=1e-3))
    try:
        names = [n for n, _ in built.models[0].named_parameters()]
        assert "blocks.0.context_adaln.weight" in names and is_text_stream("blocks.3.attention.context_linear_qkv.bias")
        assert not is_text_stream("blocks.0.attention.linear_qkv.weight") and \
            not is_text_stream("embeddings.context_embedder.weight")
        ds = MockDataset(16, latent_size=(8, 8), text_len=16, text_dim=32, pooled_dim=32)
        flow = FlowMatchingConfig(text_dropout=0.25)
        ev = Evaluator(cfg, built.ddp, ValidationSet(ds, 8), global_batch_size=4, micro_batch_size=2, seed=0,
                       timesteps=2, flow=flow, grad_norms=True)
        before = {n: p.detach().clone() for n, p in built.models[0].named_parameters()}
        r = ev.evaluate(1)
        for n, p in built.models[0].named_parameters():
            assert torch.equal(p, before[n]), n  # no optimizer step
        d, g = r["grad_norm_text_denoise"], r["grad_norm_text_recon"]
        assert d > 0 and g > 0 and r["text_recon_grad_ratio"] == g / d
        assert "grad_norm_text_denoise:" in eval_log_line(r) and "text_recon_grad_ratio:" in eval_log_line(r)

        # the same microbatches by hand: each term alone, and training's whole loss
        mbs = ev._microbatches(ev.batches[0])
        step = TermGradStep(cfg, built.ddp, None, global_batch_size=4, micro_batch_size=2, seed=0, flow=flow)
        per_term = {}
        for term in ("denoise_loss", "text_recon_loss"):
            step.term = term
            step(mbs, 0)
            per_term[term] = _text_grads(built)
        TrainStep(cfg, built.ddp, None, global_batch_size=4, micro_batch_size=2, seed=0, flow=flow)(mbs, 0)
        whole = _text_grads(built)

        def norm(gs):
            return math.sqrt(sum(float(v.double().pow(2).sum()) for v in gs.values()))

        assert d == pytest.approx(norm(per_term["denoise_loss"]), rel=1e-12)
        assert g == pytest.approx(norm(per_term["text_recon_loss"]), rel=1e-12)
        # the terms' gradients add up to training's (the loss is their sum)
        for n, v in whole.items():
            err = (per_term["denoise_loss"][n] + per_term["text_recon_loss"][n] - v).abs().max()
            assert float(err) <= BOUND * float(v.abs().max()) + 1e-12, n
        # gamma scales the recon gradient and nothing else
        cfg.text_recon_gamma = 1.0
        r2 = ev.evaluate(1)
        assert r2["grad_norm_text_denoise"] == d
        assert r2["grad_norm_text_recon"] == pytest.approx(2 * g, rel=1e-6)
    finally:
        built.free()
