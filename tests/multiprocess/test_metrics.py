"""megatron_sd3/training/metrics.py: JSON lines, the names TensorBoard/W&B get, W&B offline."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _ranks import ROOT
from megatron_sd3.training.metrics import MetricsError, MetricsWriter, WandbSettings, check_wandb, scalars

EVAL = {"type": "eval", "iteration": 4, "loss": 1.5, "denoise_loss": 1.25, "text_recon_loss": 0.5,
        "loss_at_t": {"0.25": 1.0, "0.75": 1.5}, "valid_samples": 8,
        "ema": {"loss": 2.0, "denoise_loss": 1.75, "text_recon_loss": 0.5, "loss_at_t": {"0.25": 1.5}}}


def test_scalar_names_of_train_and_eval_rows():
    assert scalars({"type": "train", "iteration": 3, "loss": 1.0, "grad_norm": None, "lr": float("nan")}) == \
        {"loss": 1.0}
    s = scalars(EVAL)
    assert s["validation/loss"] == 1.5 and s["validation/denoise_loss_at_t/0.75"] == 1.5
    assert s["validation-ema/denoise_loss"] == 1.75 and s["validation-ema/denoise_loss_at_t/0.25"] == 1.5
    assert "validation/iteration" not in s and "validation/type" not in s


def test_json_lines_only_on_rank_0(tmp_path):
    p = tmp_path / "m.jsonl"
    w = MetricsWriter(str(p), None, rank=0)
    w.write({"type": "train", "iteration": 1, "loss": 2.0})
    w.write(EVAL)
    w.close()
    MetricsWriter(str(tmp_path / "other.jsonl"), None, rank=1).write(EVAL)
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    assert rows[1] == EVAL and rows[0]["type"] == "train"
    assert not (tmp_path / "other.jsonl").exists()


def test_missing_wandb_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MetricsError, match="pip install wandb"):
        check_wandb(WandbSettings("proj"))
    from megatron_sd3.training.pretrain import main

    code = main(["--config", "configs/sd3_light_tiny.toml", "--wandb-project", "proj"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--wandb-project needs wandb" in err


@pytest.mark.timeout(600)
def test_pretrain_sends_train_eval_and_samples_to_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_sd3.py"), "--config", "configs/sd3_light_tiny.toml",
         "--train-iters", "2", "--lr-decay-iters", "8", "--log-interval", "1", "--no-progress", "--mock-num-samples", "32",
         "--valid-samples", "8", "--eval-interval", "2", "--eval-timesteps", "2", "--sample-interval", "2",
         "--sample-steps", "1", "--sample-num", "2", "--save", str(tmp_path / "ck"),
         "--wandb-project", "sd3-test", "--wandb-exp-name", "offline-check", "--wandb-save-dir", str(tmp_path / "wb")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    data = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
    for key in (b"denoise_loss", b"grad_norm", b"validation/denoise_loss", b"validation/denoise_loss_at_t/0.25",
                b"validation-ema/loss", b"offline-check"):
        assert key in data, key
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "samples_*.png"))


def test_image_goes_to_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricsWriter(None, None, WandbSettings("p", "img", str(tmp_path)), {"a": 1}, rank=0)
    w.image("samples", np.full((8, 8, 3), 200, np.uint8), 3)
    w.close()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "samples_*.png"))
