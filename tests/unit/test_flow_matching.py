import pytest
import torch

from megatron_sd3.flow_matching import FlowMatchingConfig, drop_text, make_flow_inputs, sample_timesteps


def test_interpolation_and_target():
    x0 = torch.randn(3, 4, 2, 2)
    s = make_flow_inputs(x0, positions=[5, 6, 7], seed=1)
    t = (s.timestep / 1000).view(-1, 1, 1, 1)
    noise = s.target + x0
    assert torch.allclose(s.noisy, (1 - t) * x0 + t * noise, atol=1e-6)
    assert ((s.timestep > 0) & (s.timestep < 1000)).all()


def test_per_sample_keys_make_layout_independent_draws():
    x0 = torch.randn(4, 4, 2, 2)
    whole = make_flow_inputs(x0, positions=range(10, 14), seed=3)
    half = make_flow_inputs(x0[2:], positions=range(12, 14), seed=3)
    assert torch.equal(whole.target[2:], half.target) and torch.equal(whole.timestep[2:], half.timestep)
    other = make_flow_inputs(x0, positions=range(10, 14), seed=4)
    assert not torch.equal(whole.target, other.target)


def test_logit_normal_and_shift():
    base = sample_timesteps(4000, FlowMatchingConfig())
    assert abs(float(base.mean()) - 0.5) < 0.02 and float(base.std()) < 0.25  # concentrated mid-range
    shifted = sample_timesteps(4000, FlowMatchingConfig(shift=3.0))
    assert float(shifted.mean()) > float(base.mean()) + 0.1
    uni = sample_timesteps(4000, FlowMatchingConfig(weighting="uniform"))
    assert abs(float(uni.std()) - (1 / 12) ** 0.5) < 0.02


def test_text_dropout_zeroes_whole_samples():
    x0 = torch.randn(64, 1, 2, 2)
    s = make_flow_inputs(x0, positions=range(64), seed=0, cfg=FlowMatchingConfig(text_dropout=0.5))
    assert 10 < int((~s.keep_text).sum()) < 54
    emb, pooled = drop_text(torch.ones(64, 3, 2), torch.ones(64, 2), s.keep_text)
    assert torch.equal(emb[:, 0, 0], s.keep_text.float()) and torch.equal(pooled[:, 0], s.keep_text.float())


def test_device_generators_give_sample_generator_numbers_on_cpu():
    from megatron_sd3.data._seeding import sample_generator
    from megatron_sd3.flow_matching import device_generator

    a, b = device_generator(7, 123, "cpu"), sample_generator(7, 123)
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))


def test_draws_independent_of_microbatch_split_with_shift_and_dropout():
    """Per-sample 0-d arithmetic: a sample's numbers do not depend on its microbatch's size,
    also for 64 samples (where batched CPU kernels would round differently)."""
    cfg = FlowMatchingConfig(shift=3.0, text_dropout=0.3)
    x0 = torch.randn(64, 2, 2, 2)
    whole = make_flow_inputs(x0, positions=range(64), seed=5, cfg=cfg)
    for lo in (0, 17, 40):
        part = make_flow_inputs(x0[lo:lo + 3], positions=range(lo, lo + 3), seed=5, cfg=cfg)
        for f in ("noisy", "target", "timestep", "keep_text"):
            assert torch.equal(getattr(whole, f)[lo:lo + 3], getattr(part, f)), f


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_stay_on_the_device_and_are_layout_independent():
    cfg = FlowMatchingConfig(shift=3.0, text_dropout=0.3)
    x0 = torch.randn(8, 4, 4, 4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        whole = make_flow_inputs(x0, positions=range(8), seed=5, cfg=cfg)
        half = make_flow_inputs(x0[4:], positions=range(4, 8), seed=5, cfg=cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert whole.noisy.device.type == "cuda"
    assert torch.equal(whole.target[4:], half.target) and torch.equal(whole.timestep[4:], half.timestep)
