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
    uni = sample_timesteps(4000, FlowMatchingConfig(timestep_sampling="uniform"))
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


# -- diffusers' SD3 training recipe: --weighting-scheme, the mode density, --precondition-outputs --------

SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_weighting_equals_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from megatron_sd3.flow_matching import loss_weighting

    sigmas = torch.cat([torch.linspace(1e-3, 1 - 1e-3, 999), torch.tensor([0.25, 0.5, 0.75, 1.0])])
    ours, theirs = loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas)
    rel = ((ours - theirs).abs() / theirs.abs()).max()
    assert ours.shape == theirs.shape and float(rel) <= 1e-6, (scheme, float(rel))


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap of the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


@pytest.mark.parametrize("scheme", ["mode", "logit_normal", "cosmap"])
def test_timestep_density_follows_diffusers(scheme):
    """20 000 of our per-sample draws against 20 000 of diffusers' batch draws (independent
    generators): the same distribution, KS distance <= 0.03 (the 1% critical value is 0.016)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 20_000
    ours = sample_timesteps(n, FlowMatchingConfig(weighting_scheme=scheme, mode_scale=1.29))
    theirs = compute_density_for_timestep_sampling(scheme, n, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(99))
    assert _ks(ours, theirs) <= 0.03, _ks(ours, theirs)
    if scheme == "mode":  # and not the uniform or logit-normal density it resembles least
        assert _ks(ours, torch.rand(n, generator=torch.Generator().manual_seed(1))) > 0.05
    assert ((ours > 0) & (ours < 1)).all()


def test_mode_through_timestep_sampling_and_its_scale():
    a = sample_timesteps(2000, FlowMatchingConfig(timestep_sampling="mode", mode_scale=1.29))
    b = sample_timesteps(2000, FlowMatchingConfig(weighting_scheme="mode", mode_scale=1.29))
    assert torch.equal(a, b)
    flat = sample_timesteps(2000, FlowMatchingConfig(timestep_sampling="mode", mode_scale=0.0))
    assert _ks(flat, sample_timesteps(2000, FlowMatchingConfig(timestep_sampling="uniform"))) < 0.05


def test_x0_target_and_prediction_are_diffusers_formula():
    """diffusers' script with --precondition-outputs: model_pred = model_pred * (-sigmas) +
    noisy_model_input, target = model_input; the loss then compares the two."""
    x0 = torch.randn(3, 4, 2, 2)
    cfg = FlowMatchingConfig(precondition_outputs=True)
    s = make_flow_inputs(x0, positions=[5, 6, 7], seed=1, cfg=cfg)
    plain = make_flow_inputs(x0, positions=[5, 6, 7], seed=1)
    assert torch.equal(s.noisy, plain.noisy) and torch.equal(s.target, x0)
    sigmas = (s.timestep / 1000).view(-1, 1, 1, 1)
    pred = torch.randn_like(x0)
    assert torch.allclose(s.prediction(pred), pred * (-sigmas) + s.noisy, rtol=0, atol=1e-6)
    # the velocity that produced x_t from x0 implies x0 exactly (up to rounding)
    assert torch.allclose(s.prediction(plain.target), x0, atol=1e-5)
    assert torch.equal(plain.prediction(pred), pred)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_samples_carry_their_scheme_weights(scheme):
    from megatron_sd3.flow_matching import loss_weighting

    s = make_flow_inputs(torch.randn(5, 2, 2, 2), positions=range(5), seed=2,
                         cfg=FlowMatchingConfig(weighting_scheme=scheme, shift=3.0))
    t = s.timestep / 1000
    if scheme in ("sigma_sqrt", "cosmap"):
        assert torch.allclose(s.loss_weight, loss_weighting(scheme, t), rtol=1e-6)
        assert not torch.allclose(s.loss_weight, torch.ones(5))
    else:
        assert s.loss_weight is None  # unit weights cost nothing


def test_a_contradictory_pair_is_one_error():
    with pytest.raises(ValueError, match="--weighting-scheme sigma_sqrt samples t uniform .* --timestep-sampling "
                                         "is logit_normal"):
        FlowMatchingConfig(timestep_sampling="logit_normal", weighting_scheme="sigma_sqrt")
    assert FlowMatchingConfig(timestep_sampling="uniform", weighting_scheme="cosmap").weighting_scheme == "cosmap"
    assert FlowMatchingConfig(timestep_sampling="uniform").weighting_scheme == "none"
    assert FlowMatchingConfig().timestep_sampling == "logit_normal"
