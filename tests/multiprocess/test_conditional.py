"""Does the text condition the image? The tiny preset trained through pretrain_sd3.py on a
conditional synthetic task (``--mock-classes 4``: each class a fixed text embedding and its own
latent pattern), with text dropout for classifier-free guidance, then sampled with guidance by
tools/generate.py from the class prompts: each sample must look like its own class's pattern far
more often than chance (1/4)."""
import os
import subprocess
import sys

import pytest
import torch

from _ranks import ROOT

K, PER_CLASS, SEED = 4, 8, 1234
TRAIN = ["--config", "configs/sd3_light_tiny.toml", "--mock-classes", str(K), "--mock-num-samples", "512",
         "--mock-latent-size", "8x8", "--text-dropout", "0.2", "--timestep-sampling", "uniform",
         "--train-iters", "600", "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "2e-3",
         "--min-lr", "2e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "10", "--ema-decay", "0",
         "--log-interval", "100", "--no-progress", "--seed", str(SEED)]


def classify(latents, patterns):
    """Nearest class pattern (mean squared distance) of each sample."""
    d = ((latents[:, None].float() - patterns[None]) ** 2).flatten(2).mean(-1)
    return d.argmin(1)


@pytest.mark.timeout(600)
def test_samples_follow_their_prompts(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_sd3.data.mock import MockDataset

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ck = tmp_path / "ck"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_sd3.py"), *TRAIN, "--save", str(ck)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    ds = MockDataset(512, (8, 8), 16, 16, 32, 32, seed=SEED, classes=K)  # the run's data (tiny preset widths)
    text, pooled = ds.class_prompts()
    labels = torch.arange(K).repeat_interleave(PER_CLASS)
    save_file({"prompt_embeds": text[labels].contiguous(), "pooled_prompt_embeds": pooled[labels].contiguous()},
              str(tmp_path / "prompts.safetensors"))
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", str(ck),
                          "--prompt-embeds", str(tmp_path / "prompts.safetensors"),
                          "--output-latents", str(tmp_path / "samples.safetensors"), "--steps", "10",
                          "--cfg-scale", "3", "--shift", "1", "--seed", "0", "--latent-size", "8x8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    latents = load_file(str(tmp_path / "samples.safetensors"))["latents"]
    patterns = ds.class_patterns(8, 8)
    pred = classify(latents, patterns)
    accuracy = float((pred == labels).float().mean())
    # chance is 1/4; a model that ignores its text (or samples that ignore the model) gets about that
    assert accuracy >= 0.6, (accuracy, pred.tolist())
    # and each prompt's average sample is its own pattern
    means = torch.stack([latents[labels == c].mean(0) for c in range(K)])
    assert classify(means, patterns).tolist() == list(range(K)), classify(means, patterns).tolist()
