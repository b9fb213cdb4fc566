"""Does the text condition the image? ``make demo`` as a newcomer runs it: the tiny preset trained
through launch.sh (PP=2, text reconstruction on) on the conditional synthetic task
(``--mock-classes 4``: each class a fixed text embedding and its own latent pattern), ending with
a sample grid of each class's prompt (one row per class) and the share of samples that follow
their prompt. Then tools/generate.py samples the demo's checkpoint with guidance from the class
prompts: each sample must look like its own class's pattern far more often than chance (1/4)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from _ranks import ROOT

K, PER_CLASS, SEED = 4, 8, 1234


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "GPUS_PER_NODE", "NNODES")}
    run = subprocess.run(["make", "-s", "demo", f"DEMO_DIR={out}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout, run.stderr


@pytest.mark.timeout(600)
def test_make_demo_learns_to_follow_the_prompts(demo):
    from PIL import Image

    out, log, err = demo
    # quiet: no warning on stderr from any rank (megatron's TE/apex fallbacks, torchao, torchrun's
    # OMP banner); launch.sh's checks print the environment report once, before the ranks, and the
    # arguments block says once whether Transformer Engine is installed
    noisy = [line for line in err.splitlines() if not line.startswith(("launch.sh: ", "pretrain_sd3.py: checks passed"))]
    assert not noisy, "\n".join(noisy[:40])
    assert log.count("-- environment --") == 1 and log.index("-- environment --") < log.index("-- arguments --")
    arguments = log[log.index("-- arguments --"):log.index("end of arguments")]
    assert sum("Transformer Engine" in line for line in arguments.splitlines()) == 1
    summary = log[log.index("-- summary --"):]
    m = re.search(r"\n  samples following their prompt: ([0-9.]+) \((\d+) of (\d+); chance 0.25\)\n", summary)
    assert m, summary
    hits, n = int(m.group(2)), int(m.group(3))
    assert n == K * PER_CLASS and hits / n >= 0.9, m.group(0)
    assert "text_recon_loss value:" in log  # text reconstruction on, and validated
    # the metrics row of the grid: the share with the run's guidance (as the line) and without
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    judged = [r for r in rows if r["type"] == "samples"]
    assert len(judged) == 1 and judged[0]["prompt_following"] == hits / n
    assert 0 <= judged[0]["prompt_following_no_guidance"] <= 1
    # the grid: a row per class (8x8 latents enlarged to 64 px, 2 px gaps), labels on the left
    grid = np.asarray(Image.open(out / "checkpoints" / "samples" / "iter_0000400.png").convert("RGB"))
    assert grid.shape[0] == K * 64 + (K - 1) * 2
    margin = grid.shape[1] - (PER_CLASS * 64 + (PER_CLASS - 1) * 2)
    assert 40 <= margin <= 80
    for r in range(K):  # each row's label: dark text on white
        label = grid[r * 66:r * 66 + 64, :margin]
        assert (label < 100).all(-1).any() and (label == 255).all(-1).any(), r
    # the rows look different: each row's mean image is nearest its own class's preview
    tiles = np.stack([[grid[r * 66:r * 66 + 64, margin + c * 66:margin + c * 66 + 64].astype(float)
                       for c in range(PER_CLASS)] for r in range(K)])  # [K, PER_CLASS, 64, 64, 3]
    means = tiles.mean(1)
    dist = ((means[:, None] - means[None]) ** 2).mean((2, 3, 4))
    assert (dist + np.eye(K) * 1e9).min() > 100, dist  # rows far apart in pixel space


@pytest.mark.timeout(600)
def test_generate_samples_follow_their_prompts(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_sd3.data.mock import MockDataset

    out, _, _ = demo
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ds = MockDataset(4096, (8, 8), 16, 16, 32, 32, seed=SEED, classes=K)  # the demo's data (tiny preset widths)
    text, pooled, labels = ds.prompt_rows(PER_CLASS)
    save_file({"prompt_embeds": text, "pooled_prompt_embeds": pooled}, str(tmp_path / "prompts.safetensors"))
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load",
                          str(out / "checkpoints"), "--prompt-embeds", str(tmp_path / "prompts.safetensors"),
                          "--output-latents", str(tmp_path / "samples.safetensors"), "--steps", "10",
                          "--cfg-scale", "3", "--shift", "3", "--seed", "7", "--latent-size", "8x8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    latents = load_file(str(tmp_path / "samples.safetensors"))["latents"]
    pred = ds.classify(latents)
    accuracy = float((pred == labels).float().mean())
    # chance is 1/4; a model that ignores its text (or samples that ignore the model) gets about that
    assert accuracy >= 0.9, (accuracy, pred.tolist())
    # and each prompt's average sample is its own pattern
    means = torch.stack([latents[labels == c].mean(0) for c in range(K)])
    assert ds.classify(means).tolist() == list(range(K)), ds.classify(means).tolist()
