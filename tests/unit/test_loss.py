import pytest
import torch

from megatron_sd3.flow_matching import FlowSample
from megatron_sd3.loss import combine_local, denoise_terms, text_recon_terms
from megatron_sd3.models.sd3_light import LightSD3Pipeline


def test_plain_mse_when_gamma_zero():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = combine_local(pred, target, torch.tensor([]))
    assert torch.allclose(out.total, ((pred - target) ** 2).mean())
    assert out["text_recon_loss"] == 0


def test_mask_broadcasts_over_channels_and_divides_by_weight():
    pred, target = torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    mask = torch.zeros(2, 3, 3)
    mask[0, 0, 0] = 1.0
    mask[1, 2, 2] = 0.5
    s, w = denoise_terms(pred, target, mask)
    expect_s = (pred[0, :, 0, 0] ** 2).sum() + 0.5 * (pred[1, :, 2, 2] ** 2).sum()
    assert torch.allclose(s, expect_s) and float(w) == pytest.approx(4 * 1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        denoise_terms(pred, target, torch.ones(2, 5, 5))


def test_pseudo_huber():
    pred, target = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    out = combine_local(pred, target, None, pseudo_huber_c=1.0)
    expect = ((torch.sqrt(torch.tensor([9.0, 16.0]) + 1) - 1)).mean()
    assert torch.allclose(out.total, expect)


def test_breakdown_and_detached_target():
    pred, target = torch.ones(1, 2), torch.zeros(1, 2)
    final = torch.full((1, 3, 2), 2.0, requires_grad=True)
    tgt = torch.zeros(1, 3, 2, requires_grad=True)
    out = combine_local((pred, final, tgt), target, None, text_recon_gamma=0.25)
    assert out.as_dict() == pytest.approx({"loss": 1 + 0.25 * 4, "denoise_loss": 1.0, "text_recon_loss": 4.0})
    out.total.backward()
    assert final.grad is not None and tgt.grad is None
    s, n = text_recon_terms(final, tgt)
    assert float(s) == 24.0 and float(n) == 6


def test_pipeline_rejects_bad_model_config():
    pipe = LightSD3Pipeline(model_config={"text_recon_gama": 0.5})
    with pytest.raises(ValueError, match="did you mean 'text_recon_gamma'"):
        pipe.get_loss_fn()


# -- the loss-term registry: a new term is one function and one config field ----------------------

DEFAULT_TERMS = ["denoise_loss", "text_recon_loss"]


def _pred_l2(seen):
    def pred_l2(inp):
        """The new term: mean squared prediction, as (sum, weight) of one microbatch."""
        p = inp.pred.float()
        seen.append(p.detach().clone())
        return (p * p).sum(), torch.tensor(float(p.numel()), device=p.device)
    return pred_l2


@pytest.fixture
def pred_l2_term():
    """``pred_l2_loss`` weighted by the config field ``pred_l2_weight``, registered for one test."""
    from megatron_sd3.loss import LOSS_TERMS, register_loss_term, unregister_loss_term

    assert list(LOSS_TERMS) == DEFAULT_TERMS
    seen = []
    register_loss_term("pred_l2_loss", _pred_l2(seen), weight_field="pred_l2_weight")
    try:
        yield seen
    finally:
        unregister_loss_term("pred_l2_loss")
    assert list(LOSS_TERMS) == DEFAULT_TERMS


def _batch(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"latents": torch.randn(2, cfg.in_channels, 8, 8, generator=g),
             "prompt_embeds": torch.randn(2, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
             "pooled_prompt_embeds": torch.randn(2, cfg.pooled_projection_dim, generator=g)} for _ in range(n)]


@pytest.fixture
def tiny_step(single_process):
    yield from _tiny_step()


@pytest.fixture
def recon_step(single_process):
    yield from _tiny_step(text_recon_gamma=0.5)


def _tiny_step(**fields):
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", zero_init_adaln=False, **fields)
    built = build_training(cfg, optimizer=dict(lr=1e-3))
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=3,
                     forward_only=True)
    yield cfg, step
    built.free()


def test_new_term_in_step_loss_report_and_metrics(tiny_step, pred_l2_term):
    from megatron_sd3.training.pretrain import log_line, metrics_record

    cfg, step = tiny_step
    batch = _batch(cfg, step.num_microbatches)
    cfg.pred_l2_weight = 0.0  # the one new config field; weight 0: the term is off
    off = step(batch, 0)
    assert off.losses["pred_l2_loss"] == 0.0 and off.losses["loss"] == off.losses["denoise_loss"]
    assert not pred_l2_term  # a disabled term is not computed
    cfg.pred_l2_weight = 0.3
    on = step(batch, 0)
    assert len(pred_l2_term) == 2  # once per microbatch
    expect = sum(float((p * p).sum()) for p in pred_l2_term) / sum(p.numel() for p in pred_l2_term)
    assert on.losses["pred_l2_loss"] == pytest.approx(expect, rel=1e-6)
    assert on.losses["denoise_loss"] == off.losses["denoise_loss"]  # the other terms are untouched
    assert on.losses["loss"] == pytest.approx(on.losses["denoise_loss"] + 0.3 * expect, rel=1e-6)
    # the metrics record and the log line list it
    rec = metrics_record(1, 4, 0.5, 1, 4, 1e12, 1, 1e-3, on, 0)
    assert [k for k in rec if k.endswith("loss")] == ["loss", *DEFAULT_TERMS, "pred_l2_loss"]
    assert rec["pred_l2_loss"] == on.losses["pred_l2_loss"]
    assert f"pred_l2_loss: {on.losses['pred_l2_loss']:.6E} | grad norm" in log_line(rec, 10)


def test_new_term_in_the_backpropagated_loss(tiny_step, pred_l2_term):
    """The step's megatron loss: ``gbs * (denoise_sum / W + weight * term_sum / P)`` with the
    global weights given up front; its gradient carries the new term."""
    cfg, step = tiny_step
    cfg.pred_l2_weight = 0.3
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 16, 8, 8, generator=g)
    weights = {"denoise_loss": 3000.0, "pred_l2_loss": 5000.0}  # as if the global batch were bigger
    flow = FlowSample(noisy=target, target=target, timestep=torch.full((2,), 500.0),
                      keep_text=torch.ones(2, dtype=torch.bool))
    loss, count, report = step._loss_func(target, flow, None, weights, pred)
    assert set(report) == {"denoise_loss", "pred_l2_loss"} and int(count) == 2
    d, p = (pred - target).detach(), pred.detach()
    expect = step.gbs * ((d * d).sum() / 3000.0 + 0.3 * (p * p).sum() / 5000.0)
    assert torch.allclose(loss, expect, rtol=1e-6)
    loss.backward()
    assert torch.allclose(pred.grad, step.gbs * (2 * d / 3000.0 + 0.3 * 2 * p / 5000.0), rtol=1e-5)
    assert torch.equal(report["pred_l2_loss"], torch.stack([(p * p).sum(), torch.tensor(float(p.numel()))]))


def test_new_term_in_the_local_loss(pred_l2_term):
    """The seed's local means (``combine_local``) sum the same registry."""
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = combine_local(pred, target, None, pred_l2_weight=0.5)
    assert torch.allclose(out["pred_l2_loss"], (pred ** 2).mean())
    assert torch.allclose(out.total, ((pred - target) ** 2).mean() + 0.5 * (pred ** 2).mean())


def test_registry_restored_and_names_unique(tiny_step):
    from megatron_sd3.loss import LOSS_TERMS, register_loss_term

    cfg, step = tiny_step
    assert list(LOSS_TERMS) == DEFAULT_TERMS  # nothing left behind by the tests above
    assert list(step(_batch(cfg, step.num_microbatches), 0).losses) == ["loss", *DEFAULT_TERMS]
    with pytest.raises(ValueError, match="already registered"):
        register_loss_term("denoise_loss", lambda inp: None)
    assert list(LOSS_TERMS) == DEFAULT_TERMS


def test_text_recon_leaves_out_dropped_samples_exactly():
    g = torch.Generator().manual_seed(0)
    final, tgt = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    keep = torch.tensor([True, False, True, False])
    s, n = text_recon_terms(final, tgt, keep)
    assert torch.allclose(s, ((final - tgt) ** 2)[keep].sum(), rtol=1e-6) and float(n) == 2 * 5 * 8
    s, n = text_recon_terms(final, tgt, torch.zeros(4, dtype=torch.bool))
    assert float(s) == 0 and float(n) == 0
    pred = torch.randn(4, 3, 2, 2, generator=g)
    out = combine_local((pred, final, tgt), pred, None, keep_text=keep, text_recon_gamma=0.5)
    assert torch.allclose(out["text_recon_loss"], ((final - tgt) ** 2)[keep].mean())
    empty = combine_local((pred, final, tgt), pred, None, keep_text=~keep & False, text_recon_gamma=0.5)
    assert float(empty["text_recon_loss"]) == 0 and float(empty.total) == 0


def _recon_step(single_process, dropout, text_len=None):
    from megatron_sd3.config import make_config
    from megatron_sd3.flow_matching import FlowMatchingConfig
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", zero_init_adaln=False, text_recon_gamma=0.5, text_recon_target_layer=1)
    built = build_training(cfg, optimizer=dict(lr=1e-3))
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=3,
                     flow=FlowMatchingConfig(text_dropout=dropout), forward_only=True)
    return cfg, built, step


@pytest.mark.parametrize("text_len", [None, 9])
def test_step_text_recon_counts_only_kept_samples(single_process, text_len):
    """The global text-recon mean of a step with text dropout: the samples whose text was kept,
    and only those (a text length other than the declared one works in a single stage)."""
    from megatron_sd3.flow_matching import drop_text, make_flow_inputs

    cfg, built, step = _recon_step(single_process, 0.5)
    batch = _batch(cfg, step.num_microbatches)
    if text_len is not None:
        for mb in batch:
            mb["prompt_embeds"] = mb["prompt_embeds"][:, :text_len]
    res = step(batch, 8)
    model, s, n, kept = built.models[0], 0.0, 0, []
    with torch.no_grad():
        for m, mb in enumerate(batch):
            flow = make_flow_inputs(mb["latents"], step._positions(8, m), step.seed, step.flow)
            text, pooled = drop_text(mb["prompt_embeds"], mb["pooled_prompt_embeds"], flow.keep_text)
            _, final, tgt = model(flow.noisy, text, pooled, flow.timestep)
            assert final.shape[1] == mb["prompt_embeds"].shape[1]
            err = (final - tgt) ** 2
            s += float(err[flow.keep_text].sum())
            n += int(flow.keep_text.sum()) * err[0].numel()
            kept += flow.keep_text.tolist()
    assert True in kept and False in kept  # the case under test: some dropped, some kept
    assert res.losses["text_recon_loss"] == pytest.approx(s / n, rel=1e-5)
    built.free()


def test_step_with_every_text_dropped_is_finite(single_process):
    cfg, built, step = _recon_step(single_process, 0.999)
    res = step(_batch(cfg, step.num_microbatches), 0)
    assert res.losses["text_recon_loss"] == 0.0
    assert res.losses["loss"] == pytest.approx(res.losses["denoise_loss"]) and res.losses["loss"] > 0
    built.free()


# -- diffusers' per-sample weights and x0 target in the step's loss ---------------------------------------

def test_scheme_weights_enter_the_denoise_term_once_as_diffusers(recon_step):
    """The step's megatron loss under --weighting-scheme sigma_sqrt --precondition-outputs is
    diffusers' ``mean((weighting * (model_pred * -sigma + x_t - x0) ** 2).reshape(B, -1), 1)``
    summed over the samples (times gbs / global element count), and the text term is unweighted."""
    from megatron_sd3.flow_matching import FlowMatchingConfig, make_flow_inputs

    cfg, step = recon_step
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    pred = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)
    final, target_tok = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    flow = make_flow_inputs(x0, [0, 1], seed=3, cfg=FlowMatchingConfig(weighting_scheme="sigma_sqrt",
                                                                       precondition_outputs=True))
    sig = (flow.timestep / 1000).view(-1, 1, 1, 1)
    # diffusers' train_dreambooth_sd3.py, with its variable names
    model_pred = pred.detach() * (-sig) + flow.noisy
    weighting = (sig ** -2.0).float()
    per_sample = torch.mean((weighting * (model_pred - x0) ** 2).reshape(2, -1), 1)
    weights = {"denoise_loss": float(x0.numel()), "text_recon_loss": float(final.numel())}
    loss, _, report = step._loss_func(x0, flow, None, weights, (pred, final, target_tok))
    recon = ((final - target_tok) ** 2).mean()
    assert torch.allclose(loss / step.gbs, per_sample.mean() + 0.5 * recon, rtol=1e-5)
    assert torch.allclose(report["denoise_loss"][0] / report["denoise_loss"][1], per_sample.mean(), rtol=1e-5)
    assert torch.allclose(report["text_recon_loss"][0] / report["text_recon_loss"][1], recon, rtol=1e-6)


def test_weighted_step_keeps_the_text_term_and_the_draws(recon_step):
    """--weighting-scheme cosmap draws the same uniform t as `none`: the text term is the same
    number, the denoise term differs by the weights."""
    from megatron_sd3.flow_matching import FlowMatchingConfig

    cfg, step = recon_step
    batch = _batch(cfg, step.num_microbatches)
    step.flow = FlowMatchingConfig(weighting_scheme="none")
    plain = step(batch, 0).losses
    step.flow = FlowMatchingConfig(weighting_scheme="cosmap")
    weighted = step(batch, 0).losses
    assert weighted["text_recon_loss"] == plain["text_recon_loss"] > 0
    assert abs(weighted["denoise_loss"] / plain["denoise_loss"] - 1) > 1e-3
