"""The CLIP score at each evaluation (pretrain_sd3.py --clip-model, training/evaluate.py ClipEval):
the score of the evaluation row is CLIPScorer's score of the saved sample grid's images against
the prompt file's texts; without --sd3-root or without prompt texts it is a one-line refusal."""
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _data_fixtures import build_tiny_sd3_encoders  # noqa: E402
from _ranks import run_ranks  # noqa: E402
from test_generate_tools import _tiny_clip  # noqa: E402

BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8",
        "--mock-num-samples", "32", "--valid-samples", "8"]
PROMPTS = ["a red cat on the mat", "the blue sky", "a small house in a tree"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipeval")
    build_tiny_sd3_encoders(root / "sd3")
    clip = _tiny_clip(root)
    g = torch.Generator().manual_seed(0)  # embeddings of the tiny model's text widths, with the texts
    emb = {"prompt_embeds": torch.randn(3, 16, 32, generator=g),
           "pooled_prompt_embeds": torch.randn(3, 32, generator=g)}
    save_file(emb, str(root / "prompts.safetensors"), metadata={"prompts": json.dumps(PROMPTS)})
    save_file(emb, str(root / "no_texts.safetensors"))
    return {"root": root, "clip": str(clip), "sd3": str(root / "sd3"), "prompts": str(root / "prompts.safetensors"),
            "no_texts": str(root / "no_texts.safetensors")}


def _tiles(path, n, side):
    grid = np.asarray(Image.open(path).convert("RGB"))
    cols = math.ceil(math.sqrt(n))
    return [torch.from_numpy(grid[r * side:(r + 1) * side, c * side:(c + 1) * side].copy()).permute(2, 0, 1)
            for r, c in (divmod(i, cols) for i in range(n))]


@pytest.mark.timeout(900)
def test_eval_rows_carry_the_clip_score_of_the_sample_grid(fixtures, tmp_path):
    from megatron_sd3.clip_score import CLIPScorer

    m = tmp_path / "m.jsonl"
    logs = run_ranks("pretrain_sd3.py", 1, [
        *BASE, "--train-iters", "2", "--eval-interval", "2", "--eval-timesteps", "1", "--sample-interval", "2",
        "--sample-steps", "2", "--sample-prompts", fixtures["prompts"], "--sd3-root", fixtures["sd3"],
        "--clip-model", fixtures["clip"], "--save", str(tmp_path / "ck"), "--metrics-file", str(m)], timeout=600)
    evals = [json.loads(line) for line in open(m) if '"eval"' in line]
    assert [r["iteration"] for r in evals] == [2]
    rec = evals[0]
    # the grid of the same iteration: the same fixed-seed samples of the same weights, VAE-decoded
    # (8x8 latents -> 64x64 images, saved unscaled), scored against the prompts in their order
    images = _tiles(tmp_path / "ck" / "samples" / "iter_0000002.png", 3, 64)
    want = CLIPScorer(fixtures["clip"]).score(images, PROMPTS)
    assert rec["clip_score"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert math.isfinite(rec["ema"]["clip_score"])
    assert f"clip_score value: {rec['clip_score']:.4f}" in logs[0]
    assert " > CLIP score at each evaluation: 3 prompts" in logs[0]


def test_clip_score_without_vae_or_prompt_texts_is_one_line(fixtures, capsys):
    from megatron_sd3.training.pretrain import main

    clip = ["--eval-interval", "2", "--clip-model", fixtures["clip"]]
    for argv, msg in (
        ([*clip, "--sample-prompts", fixtures["prompts"]],
         "--clip-model scores VAE-decoded samples and needs --sd3-root"),
        ([*clip, "--sd3-root", fixtures["sd3"]], "--clip-model needs the prompts' texts"),
        ([*clip, "--sd3-root", fixtures["sd3"], "--sample-prompts", fixtures["no_texts"]], "holds no prompt texts"),
        (["--clip-model", fixtures["clip"], "--sd3-root", fixtures["sd3"]], "needs --eval-interval"),
        (["--eval-interval", "2", "--clip-model", str(fixtures["root"]), "--sd3-root", fixtures["sd3"],
          "--sample-prompts", fixtures["prompts"]], "no config.json there"),
    ):
        try:
            code = main([*BASE, *argv])
        except SystemExit as e:
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clip_score_is_the_same_under_pipeline_parallelism(fixtures, tmp_path):
    """The initial weights do not depend on the layout: the score before the first iteration is
    the same on 1 process and on 2 pipeline stages (samples through megatron's schedule)."""
    args = [*BASE, "--train-iters", "1", "--eval-at-start", "--eval-timesteps", "1", "--sample-steps", "2",
            "--sample-prompts", fixtures["prompts"], "--sd3-root", fixtures["sd3"], "--clip-model", fixtures["clip"],
            "--ema-decay", "0"]
    got = []
    for name, nproc, extra in (("one", 1, []), ("pp2", 2, ["--pipeline-model-parallel-size", "2"])):
        m = tmp_path / f"{name}.jsonl"
        run_ranks("pretrain_sd3.py", nproc, [*args, *extra, "--metrics-file", str(m)], timeout=600)
        got.append([json.loads(line)["clip_score"] for line in open(m) if '"eval"' in line][0])
    assert got[0] > 0 and got[1] == pytest.approx(got[0], rel=1e-4)
