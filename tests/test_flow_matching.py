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
