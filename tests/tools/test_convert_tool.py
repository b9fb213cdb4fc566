"""tools/convert_diffusers_sd3.py: diffusers dir -> checkpoint (PP=2 writer) -> training -> diffusers dir."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

from _ranks import one_process_env, run_ranks, run_script  # noqa: E402
from test_parity import _inputs, _random_diffusers, _rel  # noqa: E402

TOOL = "tools/convert_diffusers_sd3.py"


@pytest.mark.slow  # the default suite: test_parity's conversions and test_sampling's converted checkpoints
@pytest.mark.timeout(400)
def test_round_trip_through_a_checkpoint_and_training(tmp_path, single_process):
    d = _random_diffusers(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    d.save_pretrained(tmp_path / "base")
    ck = str(tmp_path / "ck")
    # written by a PP=2 layout, truncated to the first 2 blocks (sd3_light-style: last keeps its text)
    run_ranks(TOOL, 2, ["to-megatron", "--diffusers", str(tmp_path / "base"), "--num-layers", "2",
                        "--text-seq-len", "7", "--save", ck, "--pipeline-model-parallel-size", "2"], timeout=200)
    env = one_process_env()
    out = tmp_path / "exported"
    r = run_script(TOOL, ["to-diffusers", "--load", ck, "--output", str(out)], env=env, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = SD3Transformer2DModel.from_pretrained(out).eval()
    # the same velocity as diffusers' own first two blocks of the base (checked in test_parity)
    from megatron_sd3.convert import sd3_from_diffusers

    ours = sd3_from_diffusers(d, num_layers=2, text_seq_len=7).eval()
    x = _inputs()
    with torch.no_grad():
        assert _rel(exported(**x).sample, ours(**x)) <= 1e-5

    # pretrain_sd3.py starts from the converted weights (iteration 0) on one process
    toml = tmp_path / "m.toml"
    toml.write_text("[model]\nnum_layers = 2\nhidden_size = 64\nnum_attention_heads = 4\nsample_size = 16\n"
                    "pos_embed_max_size = 24\njoint_attention_dim = 32\npooled_projection_dim = 24\n"
                    "text_seq_len = 7\nqk_norm = true\ndual_attention_layers = [0, 1]\n")
    r = run_script("pretrain_sd3.py", ["--config", str(toml), "--mock-data", "--mock-latent-size", "8x8",
                                       "--train-iters", "2", "--load", ck, "--save", str(tmp_path / "run"),
                                       "--no-progress"], env=env, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at iteration 0" in r.stdout


@pytest.mark.timeout(60)
def test_missing_inputs_are_clear_errors(tmp_path):
    r = run_script(TOOL, ["to-diffusers", "--load", str(tmp_path / "no"), "--output", str(tmp_path / "o")],
                   env=one_process_env(), timeout=60)
    assert r.returncode == 2 and "no checkpoint there" in r.stderr
    r = run_script(TOOL, ["to-megatron", "--diffusers", str(tmp_path / "no"), "--save", str(tmp_path / "c")],
                   env=one_process_env(), timeout=60)
    assert r.returncode == 2 and "diffusers transformer directory not found" in r.stderr
