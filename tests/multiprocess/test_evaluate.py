"""Validation loss and samples during training (megatron_sd3/training/evaluate.py) through
pretrain_sd3.py: fixed numbers, layout independence, training untouched, held-out data."""
import json
import os

import numpy as np
import pytest
import torch

from _ranks import ROOT, run_ranks

ENTRY = "pretrain_sd3.py"
BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8",
        "--mock-num-samples", "64"]


def _rows(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _train(tmp, name, nproc, args, timeout=600):
    m = os.path.join(tmp, f"{name}.jsonl")
    logs = run_ranks(ENTRY, nproc, [*BASE, *args, "--metrics-file", m], timeout=timeout)
    return _rows(m), logs


# -- pieces ------------------------------------------------------------------------------------------------
def test_stratified_timesteps_and_fixed_noise():
    from megatron_sd3.training.evaluate import eval_flow_inputs, eval_timesteps

    assert eval_timesteps(4) == [0.125, 0.375, 0.625, 0.875]
    x0 = torch.randn(3, 16, 4, 4)
    a, _ = eval_flow_inputs(x0, [5, 6, 7], 0.25, 1, seed=3)
    b, _ = eval_flow_inputs(x0[1:], [6, 7], 0.25, 1, seed=3)
    assert torch.equal(a.noisy[1:], b.noisy)  # keyed by the sample, not by its place in the batch
    c, _ = eval_flow_inputs(x0, [5, 6, 7], 0.25, 2, seed=3)
    assert not torch.equal(a.target, c.target)  # another timestep index, another noise
    assert torch.equal(a.timestep, torch.full((3,), 250.0)) and bool(a.keep_text.all())
    noise = a.target + x0
    assert torch.allclose(a.noisy, 0.75 * x0 + 0.25 * noise, atol=1e-6)


def test_validation_batches_stay_in_a_bucket_and_drop_the_remainder():
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.training.evaluate import ValidationSet

    ds = MockDataset(40, latent_size=[(4, 4), (4, 6)], text_len=2, text_dim=4, pooled_dim=3, seed=1)
    v = ValidationSet(ds, 20)
    batches = v.batches(4)
    assert all(len(set(ds.bucket_ids[b].tolist())) == 1 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat) and flat.min() >= 20
    assert len(flat) == sum((np.sum(ds.bucket_ids[20:] == k) // 4) * 4 for k in (0, 1))


def test_sampler_never_trains_on_the_held_out_tail():
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.data.sampler import build_data_iterator

    ds = MockDataset(20, latent_size=(4, 4), text_len=2, text_dim=4, pooled_dim=3)
    it = build_data_iterator(ds, 4, 2, 0, 1, seed=0, prefetch=0, holdout=6)
    seen = {int(i) for _ in range(40) for i in next(it)["sample_index"]}
    assert seen == set(range(14))  # every training sample over the epochs, never 14..19
    with pytest.raises(ValueError, match="holdout"):
        build_data_iterator(ds, 4, 2, 0, 1, seed=0, holdout=20)


def test_ema_swap_and_rng_are_restored_exactly(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.evaluate import Evaluator, ValidationSet

    cfg = make_config("tiny", text_recon_gamma=0.5, zero_init_adaln=False)
    built = build_training(cfg, transformer_impl="local", optimizer=dict(optimizer="adam", lr=1e-3),
                           use_distributed_optimizer=False, overlap_grad_reduce=False, torch_compile=False,
                           scheduler=None, ema_decay=0.5, ema_update_interval=1)
    try:
        ema = built.ema
        with torch.no_grad():  # make the EMA differ from the weights
            for shadow in ema.shadow:
                for v in shadow.values():
                    v.add_(0.01)
        ds = MockDataset(16, latent_size=(8, 8), text_len=16, text_dim=32, pooled_dim=32)
        ev = Evaluator(cfg, built.ddp, ValidationSet(ds, 8), global_batch_size=4, micro_batch_size=2, seed=0,
                       timesteps=3)
        before = {n: p.detach().clone() for n, p in built.models[0].named_parameters()}
        torch.manual_seed(7)
        rng = torch.get_rng_state()
        for c in built.ddp:
            c.train()
        r1 = ev.evaluate(5, ema)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(m.training for c in built.ddp for m in c.modules())
        for n, p in built.models[0].named_parameters():
            assert torch.equal(p, before[n]), n
        r2 = ev.evaluate(6, ema)
        for k in ("loss", "denoise_loss", "text_recon_loss", "loss_at_t"):
            assert r1[k] == r2[k]  # bit-identical: same weights, same numbers
        assert r1["ema"]["denoise_loss"] != r1["denoise_loss"]
        assert set(r1["loss_at_t"]) == {"0.166667", "0.5", "0.833333"}
        assert r1["denoise_loss"] == pytest.approx(np.mean(list(r1["loss_at_t"].values())), rel=1e-12)
        assert r1["valid_samples"] == 8 and r1["loss"] == pytest.approx(
            r1["denoise_loss"] + 0.5 * r1["text_recon_loss"], rel=1e-12)
    finally:
        built.free()


def test_weighted_and_plain_denoise_loss(single_process):
    """Evaluation reports the plain velocity MSE (``denoise_loss``, ``loss_at_t``: the same for
    every scheme) and ``denoise_loss_weighted``: each t's loss as the run's scheme scores it."""
    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.flow_matching import FlowMatchingConfig, loss_weighting
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.evaluate import Evaluator, ValidationSet, eval_log_line

    cfg = make_config("tiny", text_recon_gamma=0.5, zero_init_adaln=False)
    built = build_training(cfg, optimizer=dict(lr=1e-3))
    try:
        ds = MockDataset(16, latent_size=(8, 8), text_len=16, text_dim=32, pooled_dim=32)
        recs = {}
        for name, flow in [("default", None), ("cosmap", FlowMatchingConfig(weighting_scheme="cosmap")),
                           ("x0", FlowMatchingConfig(weighting_scheme="sigma_sqrt", precondition_outputs=True))]:
            ev = Evaluator(cfg, built.ddp, ValidationSet(ds, 8), global_batch_size=4, micro_batch_size=2, seed=0,
                           timesteps=3, flow=flow)
            recs[name] = ev.evaluate(1)
        d, c, x = recs["default"], recs["cosmap"], recs["x0"]
        for k in ("loss", "denoise_loss", "text_recon_loss", "loss_at_t"):
            assert d[k] == c[k] == x[k], k
        assert d["denoise_loss_weighted"] == d["denoise_loss"]
        at_t = {float(t): v for t, v in d["loss_at_t"].items()}
        cos = np.mean([float(loss_weighting("cosmap", torch.tensor(t))) * v for t, v in at_t.items()])
        assert c["denoise_loss_weighted"] == pytest.approx(cos, rel=1e-5)
        assert abs(c["denoise_loss_weighted"] / c["denoise_loss"] - 1) > 1e-2
        # x0 error = t * velocity error, weighted by 1/t^2: the plain loss again, up to rounding
        assert x["denoise_loss_weighted"] == pytest.approx(x["denoise_loss"], rel=1e-5)
        assert [d["weighting_scheme"], c["weighting_scheme"], x["weighting_scheme"]] == \
            ["logit_normal", "cosmap", "sigma_sqrt"]
        assert "denoise_loss_weighted value:" in eval_log_line(c)
    finally:
        built.free()


# -- through pretrain_sd3.py ---------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_training_is_bit_identical_with_evaluation_and_sampling(tmp_path):
    # the same held-out tail (so the same training stream), never evaluated, no samples
    plain, _ = _train(tmp_path, "plain", 1, ["--train-iters", "4", "--valid-samples", "8"])
    side, logs = _train(tmp_path, "side", 1, [
        "--train-iters", "4", "--valid-samples", "8", "--eval-interval", "2", "--eval-timesteps", "2",
        "--eval-at-start", "--sample-interval", "2", "--sample-steps", "2", "--sample-num", "2",
        "--save", str(tmp_path / "ck"), "--log-text-grad-norms"])
    train = [r for r in side if r["type"] == "train"]
    assert [r["type"] for r in plain] == ["train"] * 4 and len(train) == 4
    for a, b in zip(plain, train):
        for k in ("loss", "denoise_loss", "text_recon_loss", "grad_norm"):
            assert a[k] == b[k], (a["iteration"], k)
    evals = [r for r in side if r["type"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert set(r) >= {"loss", "denoise_loss", "text_recon_loss", "loss_at_t", "ema", "grad_norm_text_denoise",
                          "grad_norm_text_recon", "text_recon_grad_ratio"}
        assert set(r["loss_at_t"]) == {"0.25", "0.75"} and set(r["ema"]["loss_at_t"]) == {"0.25", "0.75"}
    assert " validation loss at iteration 2 | loss value:" in logs[0]
    assert " validation loss (EMA) at iteration 2 |" in logs[0]
    from PIL import Image

    names = sorted(os.listdir(tmp_path / "ck" / "samples"))
    assert names == ["iter_0000002.png", "iter_0000004.png"]
    assert Image.open(tmp_path / "ck" / "samples" / names[0]).size == (128, 64)  # 2 prompts, 8x8 enlarged 8x


@pytest.mark.timeout(1500)
def test_validation_numbers_are_the_same_under_every_layout(tmp_path):
    """The initial weights do not depend on the layout, so the evaluation before the first
    iteration must give the same numbers on 1 process, PP=2, TP=2 with sequence parallelism,
    DP=2 with the distributed optimizer and CP=2; also the text-stream gradient norms of each loss term
    (--log-text-grad-norms: gradients reduced over DP, sharded by the distributed optimizer,
    summed over the stages, TP duplicates counted once), within the fp32 bound of the layouts."""
    from _bounds import BOUND

    args = ["--train-iters", "1", "--valid-samples", "16", "--eval-at-start", "--eval-timesteps", "3",
            "--ema-decay", "0", "--log-text-grad-norms"]
    ref = [r for r in _train(tmp_path, "one", 1, args)[0] if r["type"] == "eval"][0]
    assert ref["grad_norm_text_denoise"] > 0 and ref["grad_norm_text_recon"] > 0
    for name, extra in (("pp2", ["--pipeline-model-parallel-size", "2"]),
                        ("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("dp2", ["--use-distributed-optimizer"]),
                        ("cp2", ["--context-parallel-size", "2"])):
        got = [r for r in _train(tmp_path, name, 2, [*args, *extra])[0] if r["type"] == "eval"][0]
        assert "ema" not in got
        for k in ("loss", "denoise_loss", "text_recon_loss"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), (name, k)
        for k in ("grad_norm_text_denoise", "grad_norm_text_recon", "text_recon_grad_ratio"):
            assert abs(got[k] - ref[k]) <= BOUND * ref[k], (name, k, got[k], ref[k])
        for t, v in ref["loss_at_t"].items():
            assert got["loss_at_t"][t] == pytest.approx(v, rel=1e-5), (name, t)


def test_bad_validation_input_is_one_line(capsys):
    from megatron_sd3.training.pretrain import main

    for argv, msg in (
        (["--eval-interval", "2"], "--eval-interval needs a validation set"),
        (["--valid-samples", "8", "--valid-data-path", "x"], "give one validation set"),
        (["--sample-interval", "2"], "--sample-interval writes SAVE/samples/ and needs --save"),
        (["--valid-samples", "64"], "leaves no training samples"),
    ):
        with pytest.raises(SystemExit) as e:
            main([*BASE, *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.timeout(600)
def test_preprocess_prompts_writes_sample_embeddings(tmp_path):
    pytest.importorskip("diffusers")
    import importlib.util

    from _data_fixtures import build_tiny_sd3_encoders
    from megatron_sd3.data.preprocess import EncoderPaths, Encoders
    from megatron_sd3.training.evaluate import load_prompt_embeds

    root = build_tiny_sd3_encoders(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a red cat\n\nthe blue sky\n")
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "p.safetensors"
    assert tool.main(["--prompts", str(tmp_path / "prompts.txt"), "--output", str(out), "--sd3-root", str(root),
                      "--t5-len", "8", "--quiet"]) == 0
    text, pooled, prompts = load_prompt_embeds(str(out))
    assert prompts == ["a red cat", "the blue sky"]
    want_t, want_p = Encoders(EncoderPaths.from_sd3_root(str(root)), "cpu", torch.float32, 8).encode_prompts(prompts)
    assert torch.equal(text, want_t) and torch.equal(pooled, want_p)
    assert tuple(text.shape) == (2, 77 + 8, 4096) and tuple(pooled.shape) == (2, 2048)
    assert tool.main(["--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "dir"),
                      "--sd3-root", str(root)]) == 2  # a standalone file must be a .safetensors path

    # --sd3-root: the training sample grid is decoded with that VAE, as tools/generate.py decodes
    from diffusers import AutoencoderKL

    from megatron_sd3.sampling import decode_latents
    from megatron_sd3.training.evaluate import SampleGrid, grid_image

    lat = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = SampleGrid([], text[:2], pooled[:2], (4, 4), 16, sd3_root=str(root))
    vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    want = decode_latents(vae, lat, vae.config.scaling_factor, vae.config.shift_factor)
    got = grid.images(lat)
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, want)
    assert grid_image(got).shape == (64, 128, 3)
