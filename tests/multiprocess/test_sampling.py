"""megatron_sd3.sampling and tools/generate.py against diffusers' SD3 pipeline and scheduler."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from _ranks import one_process_env, run_ranks, run_script  # noqa: E402
from megatron_sd3 import sampling  # noqa: E402
from megatron_sd3.flow_matching import drop_text  # noqa: E402

GEN = "tools/generate.py"
N, T, D, P = 2, 7, 32, 24  # prompts, text tokens, text width, pooled width (test_parity's tiny diffusers model)
HW = (8, 12)
STEPS, CFG, SHIFT, SEED = 4, 4.5, 2.5, 11


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_schedule_is_diffusers(shift, steps):
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    sigmas, timesteps = sampling.flow_match_schedule(steps, shift)
    assert torch.equal(sigmas, s.sigmas) and torch.equal(timesteps, s.timesteps)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling.flow_match_schedule(0, 3.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        sampling.flow_match_schedule(4, 0.0)


def test_guidance_feeds_training_dropout_input_and_combines_like_diffusers():
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(3, T, D, generator=g), torch.randn(3, P, generator=g)
    noise = torch.randn(3, 16, 4, 4, generator=g)
    seen = []

    def field(x, tx, pl):  # depends on the text, so that guidance matters
        return x * 0.3 + tx.mean((1, 2)).view(-1, 1, 1, 1) + pl.mean(1).view(-1, 1, 1, 1)

    def velocity(x, t, tx, pl):
        seen.append((x.clone(), t.clone(), tx.clone(), pl.clone()))
        return field(x, tx, pl)

    out = sampling.euler_sample(velocity, noise, text, pooled, steps=3, cfg_scale=5.0, shift=3.0)
    u_text, u_pool = drop_text(text, pooled, torch.zeros(3, dtype=torch.bool))
    sigmas, timesteps = sampling.flow_match_schedule(3, 3.0)
    x = noise.clone()
    for i, (xin, t, tx, pl) in enumerate(seen):
        assert torch.equal(tx[:3], u_text) and torch.equal(pl[:3], u_pool)  # uncond first, as diffusers
        assert torch.equal(tx[3:], text) and torch.equal(pl[3:], pooled)
        assert torch.equal(xin, torch.cat([x, x])) and torch.equal(t, timesteps[i].expand(6))
        v = field(xin, tx, pl)
        v = v[:3] + 5.0 * (v[3:] - v[:3])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert torch.allclose(out, x)
    # scale <= 1: no guidance, one conditional pass per step (diffusers' do_classifier_free_guidance)
    seen.clear()
    sampling.euler_sample(velocity, noise, text, pooled, steps=2, cfg_scale=1.0, shift=3.0)
    assert len(seen) == 2 and seen[0][0].shape[0] == 3 and torch.equal(seen[0][2], text)


def test_seeded_noise_is_per_sample_and_diffusers_like():
    from diffusers.utils.torch_utils import randn_tensor

    a = sampling.seeded_noise(5, 3, (16, 4, 6))
    assert torch.equal(a[1:], sampling.seeded_noise(5, 2, (16, 4, 6), first_index=1))
    ref = randn_tensor((3, 16, 4, 6), generator=[torch.Generator().manual_seed(5 + i) for i in range(3)])
    assert torch.equal(a, ref)


def test_latent_preview():
    z = torch.zeros(2, 16, 3, 5)
    z[:, 2] = 2.0  # the channel with the strongest red weight
    rgb = sampling.latent_preview(z)
    assert rgb.shape == (2, 3, 3, 5) and rgb.dtype == torch.uint8
    w = torch.tensor(sampling.SD3_LATENT_RGB_FACTORS)[2] * 2 + torch.tensor(sampling.SD3_LATENT_RGB_BIAS)
    assert torch.equal(rgb[0, :, 0, 0], ((w.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    with pytest.raises(ValueError, match="16"):
        sampling.latent_preview(torch.zeros(1, 4, 2, 2))


# -- the checkpoint, through tools/generate.py, against diffusers' pipeline ---------------------------
def _env():
    return one_process_env()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint (converted from a random diffusers model on one process; the parallel runs
    reload it under other layouts), prompt embeddings, and the same checkpoint exported to
    diffusers, sampled by diffusers' pipeline."""
    from test_parity import _random_diffusers

    from megatron_sd3.config import config_to_dict
    from megatron_sd3.convert import (diffusers_config, ensure_single_process_parallel_state, sd3_from_diffusers,
                                      sd3_to_diffusers_state_dict)
    from megatron_sd3.training import checkpointing

    tmp = tmp_path_factory.mktemp("sampling")
    ensure_single_process_parallel_state()
    converted = sd3_from_diffusers(_random_diffusers(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,)),
                                   text_seq_len=T)
    ck = str(tmp / "ck")
    checkpointing.save_checkpoint(ck, 0, [converted], None, None, None, consumed_samples=0, skipped_iters=0,
                                  model_config=config_to_dict(converted.config), run_config=None)
    g = torch.Generator().manual_seed(3)
    embeds = {"prompt_embeds": torch.randn(N, T, D, generator=g), "pooled_prompt_embeds": torch.randn(N, P, generator=g)}
    save_file(embeds, str(tmp / "embeds.safetensors"))

    # export: the checkpoint loaded on one process, as tools/convert_diffusers_sd3.py to-diffusers does
    chunks, cfg, _ = sampling.build_inference_model(ck)
    exported = SD3Transformer2DModel(**diffusers_config(cfg))
    exported.load_state_dict(sd3_to_diffusers_state_dict(chunks[0]), strict=True)
    pipe = StableDiffusion3Pipeline(transformer=exported.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    zeros_t, zeros_p = torch.zeros(N, T, D), torch.zeros(N, P)
    with torch.no_grad():
        ref = pipe(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                   negative_prompt_embeds=zeros_t, negative_pooled_prompt_embeds=zeros_p,
                   guidance_scale=CFG, num_inference_steps=STEPS, height=HW[0] * 8, width=HW[1] * 8,
                   generator=[torch.Generator().manual_seed(SEED + i) for i in range(N)],
                   output_type="latent", return_dict=False)[0]
    return {"tmp": tmp, "ck": ck, "ref": ref, "embeds": str(tmp / "embeds.safetensors")}


def _args(s, out, *extra):
    return ["--load", s["ck"], "--prompt-embeds", s["embeds"], "--output-latents", str(out), "--steps", str(STEPS),
            "--cfg-scale", str(CFG), "--shift", str(SHIFT), "--seed", str(SEED),
            "--latent-size", f"{HW[0]}x{HW[1]}", *extra]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.timeout(300)
def test_generate_matches_diffusers_one_process(setup):
    out = setup["tmp"] / "one.safetensors"
    r = run_script(GEN, _args(setup, out), env=_env(), timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out))
    assert got["latents"].shape == setup["ref"].shape
    assert _rel(got["latents"], setup["ref"]) <= 1e-5
    # the file's noise reproduces the samples without the seed (and a different seed changes them)
    again = setup["tmp"] / "again.safetensors"
    r = run_script(GEN, [*_args(setup, again, "--noise", str(out)), "--seed", "999"], env=_env(), timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(load_file(str(again))["latents"], got["latents"])


@pytest.mark.timeout(300)
def test_generate_matches_diffusers_pipeline_parallel(setup):
    """PP=2: the forward-only pipeline schedule, 2N = 4 guided rows in two microbatches of 3 (the
    last padded)."""
    out = setup["tmp"] / "pp2.safetensors"
    run_ranks(GEN, 2, _args(setup, out, "--pipeline-model-parallel-size", "2", "--micro-batch-size", "3"),
              timeout=240)
    assert _rel(load_file(str(out))["latents"], setup["ref"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_generate_matches_diffusers_tensor_and_data_parallel(setup):
    """TP=2, and DP=2 (the prompts split over two model replicas)."""
    out = setup["tmp"] / "tp2.safetensors"
    run_ranks(GEN, 2, _args(setup, out, "--tensor-model-parallel-size", "2"), timeout=240)
    assert _rel(load_file(str(out))["latents"], setup["ref"]) <= 1e-5
    out = setup["tmp"] / "dp2.safetensors"
    run_ranks(GEN, 2, _args(setup, out), timeout=240)
    assert _rel(load_file(str(out))["latents"], setup["ref"]) <= 1e-5


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    def run(*a):
        return run_script(GEN, a, env=_env(), timeout=200)

    r = run("--load", setup["ck"], "--prompts", str(tmp_path / "p.txt"), "--output-dir", str(tmp_path))
    assert r.returncode == 2 and "--prompts needs --sd3-root" in r.stderr
    bad = tmp_path / "bad.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, T + 1, D), "pooled_prompt_embeds": torch.zeros(1, P)}, str(bad))
    r = run("--load", setup["ck"], "--prompt-embeds", str(bad), "--output-latents", str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and f"the model wants [N, {T}, {D}]" in r.stderr, r.stderr[-2000:]


@pytest.mark.timeout(300)
def test_generate_matches_diffusers_context_parallel(setup):
    """CP=2: each rank holds half of the 24 image tokens of every sample, the whole text; the
    velocity is gathered on both, and the latents are diffusers' one-process pipeline's to 1e-5."""
    out = setup["tmp"] / "cp2.safetensors"
    run_ranks(GEN, 2, _args(setup, out, "--context-parallel-size", "2"), timeout=240)
    assert _rel(load_file(str(out))["latents"], setup["ref"]) <= 1e-5
