"""diffusers' SD3 training recipe (``--weighting-scheme``, ``--mode-scale``,
``--precondition-outputs``) trains, and a run says which scheme it used: the effective config,
every metrics row, the evaluation's weighted and plain denoise losses.

(That the weights are diffusers' numbers is tests/unit/test_flow_matching.py; that they enter the
loss once and leave the text term alone, tests/unit/test_loss.py; that DP=2 and PP=2 give one
process's numbers under them, tests/multiprocess/test_parallel.py.)"""
import json
import math
import os

import pytest
import torch

from _ranks import run_ranks


@pytest.mark.parametrize("scheme, x0", [(s, False) for s in ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")]
                         + [("sigma_sqrt", True), ("cosmap", True)],
                         ids=lambda v: v if isinstance(v, str) else ("x0" if v else "velocity"))
def test_each_scheme_trains_three_iterations(single_process, scheme, x0):
    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.flow_matching import FlowMatchingConfig
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", text_recon_gamma=0.5, zero_init_adaln=False)
    built = build_training(cfg, optimizer=dict(lr=1e-3, clip_grad=1.0))
    try:
        step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=1,
                         flow=FlowMatchingConfig(weighting_scheme=scheme, precondition_outputs=x0))
        ds = MockDataset(64, latent_size=(8, 8), text_len=16, text_dim=32, pooled_dim=32)
        before = {n: p.detach().clone() for n, p in built.models[0].named_parameters()}
        for it in range(3):
            mbs = [{k: torch.stack([ds[it * 4 + m * 2 + j][k] for j in range(2)]) for k in ds[0]} for m in range(2)]
            res = step(mbs, it * 4)
            assert not res.skipped and all(math.isfinite(v) for v in res.losses.values()), res.losses
            assert res.losses["denoise_loss"] > 0 and math.isfinite(res.grad_norm)
        moved = [n for n, p in built.models[0].named_parameters() if not torch.equal(p, before[n])]
        assert moved
    finally:
        built.free()


@pytest.mark.timeout(300)
def test_the_run_names_its_scheme(tmp_path):
    """Through pretrain_sd3.py with the scheme in the TOML's [flow]: the effective config beside
    the checkpoint, every training row and the evaluation rows name it; evaluation reports both
    denoise losses."""
    toml = tmp_path / "run.toml"
    toml.write_text(open("configs/sd3_light_tiny.toml").read()
                    + '\n[flow]\nweighting_scheme = "cosmap"\nprecondition_outputs = true\n')
    metrics = tmp_path / "metrics.jsonl"
    logs = run_ranks("pretrain_sd3.py", 1, [
        "--config", str(toml), "--train-iters", "3", "--log-interval", "1", "--no-progress", "--lr-warmup-iters", "0",
        "--mock-num-samples", "64", "--valid-samples", "8", "--eval-interval", "3", "--eval-timesteps", "2",
        "--ema-decay", "0", "--save", str(tmp_path / "ck"), "--metrics-file", str(metrics)], timeout=240)
    rows = [json.loads(line) for line in open(metrics)]
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert len(train) == 3 and all(r["weighting_scheme"] == "cosmap" for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert len(evals) == 1 and evals[0]["weighting_scheme"] == "cosmap"
    assert evals[0]["denoise_loss_weighted"] != evals[0]["denoise_loss"] > 0
    cfg = json.load(open(tmp_path / "ck" / "effective_config.json"))
    assert (cfg["weighting_scheme"], cfg["timestep_sampling"], cfg["precondition_outputs"]) == ("cosmap", "uniform", True)
    assert "  weighting_scheme " + "." * 24 + " cosmap\n" in logs[0]  # the arguments block
    assert "  timestep_sampling " + "." * 23 + " uniform\n" in logs[0]


def test_a_contradictory_pair_is_one_line_before_any_work(tmp_path):
    import subprocess
    import sys

    from _ranks import ROOT

    toml = tmp_path / "run.toml"
    toml.write_text('[flow]\ntimestep_sampling = "logit_normal"\n')
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_sd3.py"), "--config", str(toml), "--mock-data",
                          "--weighting-scheme", "mode", "--save", str(tmp_path / "ck")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "pretrain_sd3.py: error: --weighting-scheme mode samples t mode (as diffusers' SD3 script) but "
        "--timestep-sampling is logit_normal; give one of the two (--weighting-scheme sets both the timestep "
        "density and the loss weight)"]
    assert not (tmp_path / "ck").exists()
