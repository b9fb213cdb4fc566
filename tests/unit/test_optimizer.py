"""What build_training's optimizer adds to megatron's optimizer where apex/TE are missing: torch's fused
AdamW and torch _foreach multi-tensor kernels (same numbers as megatron's own fallbacks)."""
import torch


def test_fused_torch_adam_same_update(single_process, monkeypatch):
    """megatron's torch-AdamW fallback switched to torch's fused kernel: same step as foreach."""
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training, unwrap, use_fused_torch_adam
    from megatron_sd3.training.step import TrainStep
    import torch.optim.adam as torch_adam

    calls = []
    real = torch_adam._fused_adam
    monkeypatch.setattr(torch_adam, "_fused_adam", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    results = []
    for fused in (False, True):
        cfg = make_config("tiny", zero_init_adaln=False)
        built = build_training(cfg, optimizer=dict(lr=1e-2, weight_decay=0.01, clip_grad=1.0))
        ddp, opt = built.ddp, built.optimizer
        torch_opt = opt.optimizer
        assert not torch_opt.param_groups[0]["fused"]  # CPU: build_training leaves it (cuda only)
        if fused:
            assert use_fused_torch_adam(opt, device_types=("cpu",)) == 1
            assert all(g["fused"] and not g["foreach"] for g in torch_opt.param_groups)
        g = torch.Generator().manual_seed(0)
        batch = [{"latents": torch.randn(2, 16, 8, 8, generator=g),
                  "prompt_embeds": torch.randn(2, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
                  "pooled_prompt_embeds": torch.randn(2, cfg.pooled_projection_dim, generator=g)}]
        step = TrainStep(cfg, ddp, opt, global_batch_size=2, micro_batch_size=2, seed=1)
        for i in range(3):
            step(batch, i * 2)
        results.append(torch.cat([p.detach().flatten() for p in unwrap(ddp[0]).parameters()]))
    a, b = results
    # the fused kernel ran only in the switched run: once per parameter group and step
    assert len(calls) == 3 * len(torch_opt.param_groups)
    assert (a - b).norm() <= 1e-5 * a.norm()


def test_foreach_multi_tensor_kernels_match_megatrons_fallbacks(single_process):
    """The torch _foreach stand-ins compute what megatron's local (no apex/TE) kernels compute,
    and build_training installs them where megatron would use its local ones."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    from megatron_sd3.training import multi_tensor as mt

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (7, 300, 1, 64)]
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = mt.foreach_l2_norm(0, flag, [ts], False)
    ref, _ = mutils.local_multi_tensor_l2_norm(0, flag, [ts], False)
    assert ours.shape == (1,) and torch.allclose(ours, ref.to(ours.device), rtol=1e-6)
    for scale, dst in ((1.0, [torch.empty(t.shape, dtype=torch.bfloat16) for t in ts]),
                       (0.25, [torch.empty_like(t) for t in ts])):
        mt.foreach_scale(0, flag, [ts, dst], scale)
        assert all(torch.equal(d, (t * scale).to(d.dtype)) for t, d in zip(ts, dst))
    same = [t.clone() for t in ts]
    mt.foreach_scale(0, flag, [same, same], 0.5)  # in place, as clip_grad_by_total_norm_fp32
    assert all(torch.equal(s, t * 0.5) for s, t in zip(same, ts))

    assert mt.install()
    assert clip_grads.l2_norm_impl is mt.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is mt.foreach_scale
