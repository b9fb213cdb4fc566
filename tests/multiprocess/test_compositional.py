"""The compositional task (megatron_sd3/data/compositional.py, ``--mock-task compositional``) and its
judge (tools/judge_compositional.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_sd3.data import build_data_iterator
from megatron_sd3.data.compositional import (COLOURS, HELD_OUT, SEEN, SHAPES, CompositionalTask, Scene,
                                             colour_signatures, shape_templates, tokenizer)
from megatron_sd3.data.mock import MockDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(latent_size=(16, 16), in_channels=16, text_len=16, text_dim=32, pooled_dim=32)


@pytest.fixture(scope="module")
def data():
    return MockDataset(400, seed=3, task="compositional", **TINY)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_depends_on_seed_and_index_only_under_any_dp_layout_and_resume(data):
    again = MockDataset(400, seed=3, task="compositional", **TINY)  # another process would build this
    assert all(_same(data[i], again[i]) for i in (0, 1, 7, 399))
    assert not torch.equal(data[0]["latents"], MockDataset(400, seed=4, task="compositional", **TINY)[0]["latents"])
    # a global batch is the same samples whatever the DP layout, and resuming lands on the same batch
    whole = build_data_iterator(data, 8, 4, 0, 1, seed=3)
    batches = [next(whole) for _ in range(6)]  # 3 global batches of 2 micro batches
    for dp in (2, 4):
        its = [build_data_iterator(data, 8, 8 // dp if dp < 8 else 1, r, dp, seed=3) for r in range(dp)]
        for k in range(3):
            parts = [next(it) for it in its]
            got = torch.cat([p["latents"] for p in parts])
            want = torch.cat([batches[2 * k]["latents"], batches[2 * k + 1]["latents"]])
            assert torch.equal(got, want), (dp, k)
            assert torch.equal(torch.cat([p["prompt_embeds"] for p in parts]),
                               torch.cat([batches[2 * k]["prompt_embeds"], batches[2 * k + 1]["prompt_embeds"]]))
    resumed = build_data_iterator(data, 8, 4, 0, 1, seed=3, consumed_samples=16)
    assert _same(next(resumed), batches[4])


def test_held_out_pairs_never_appear_in_training_and_every_part_does(data):
    scenes = [data.scene(i) for i in range(len(data))]
    objects = [o for s in scenes for o in s.objects]
    assert not any(o in HELD_OUT for o in objects)
    assert set(objects) == set(SEEN)  # all 12 seen pairs, so every colour and every shape appears
    assert {c for c, _ in objects} == set(range(len(COLOURS))) and {s for _, s in objects} == set(range(len(SHAPES)))
    assert len(HELD_OUT) == 4 and {c for c, _ in HELD_OUT} == set(range(4)) and {s for _, s in HELD_OUT} == set(range(4))
    # a sample is its scene rendered plus the noise, and its text is its caption's embedding
    s = scenes[5]
    task = data.compositional
    assert (data[5]["latents"] - task.render(s, 16, 16)).std() < 0.15
    assert torch.equal(data[5]["prompt_embeds"], task.text[s.index()])
    # the evaluation prompts: n seen scenes, then n with exactly one held-out pair
    text, pooled, prompts = task.prompts(20, seed=0)
    assert text.shape == (40, 16, 32) and pooled.shape == (40, 32)
    assert not any(p.held_out for p in prompts[:20])
    assert all(sum(o in HELD_OUT for o in p.objects) == 1 for p in prompts[20:])


def test_captions_are_words_through_a_tokenizer_and_a_frozen_t5_encoder(data):
    task = data.compositional
    scene = Scene((0, 3), ((0, 1), (2, 2)))
    assert scene.caption() == "a red disk at top left and a blue cross at bottom right"
    enc = tokenizer(16).encode(scene.caption())
    assert enc.tokens[:13] == scene.caption().split() and enc.tokens[13:] == ["<pad>"] * 3
    assert task.scenes[scene.index()] == scene
    # the same words bound the other way ("blue disk ... red cross") embed differently: the
    # encoder sees word order, so the model can tell which colour goes with which shape
    swapped = Scene((0, 3), ((2, 1), (0, 2)))
    a, b = task.text[scene.index()], task.text[swapped.index()]
    assert (a - b).norm() > 0.1 * a.norm()
    assert torch.isfinite(task.text).all() and 0.5 < float(task.text.std()) < 2


def _latent(objects, channels=16, size=16):
    """A hand-made latent: {quadrant: (colour, shape)} drawn from the raw masks and signatures."""
    sig, shapes = colour_signatures(channels), shape_templates(size // 2, size // 2)
    x = torch.zeros(channels, size, size)
    for q, (c, s) in objects.items():
        r, k = (q // 2) * (size // 2), (q % 2) * (size // 2)
        x[:, r:r + size // 2, k:k + size // 2] = sig[c][:, None, None] * shapes[s]
    return x


def test_the_judge_decodes_hand_made_latents():
    task = CompositionalTask(16, 16, 32, 32)
    red_square_tl_blue_cross_br = Scene((0, 3), ((0, 0), (2, 2)))
    lat = torch.stack([
        _latent({0: (0, 0), 3: (2, 2)}),                    # right
        _latent({0: (0, 0), 3: (2, 2)}) * 0.8,              # right, fainter
        _latent({0: (0, 0), 3: (2, 2), 1: (1, 2)}),         # an extra green cross top right
        _latent({0: (1, 0), 3: (2, 2)}),                    # green square: the colour is wrong
        _latent({0: (0, 1), 3: (2, 2)}),                    # red disk: the shape is wrong
        _latent({1: (0, 0), 3: (2, 2)}),                    # the square top right: the position is wrong
        torch.zeros(16, 16, 16),                            # nothing
    ])
    assert task.decode(lat[:1]).tolist() == [[0 * 4 + 0, -1, -1, 2 * 4 + 2]]
    r = task.judge(lat, [red_square_tl_blue_cross_br] * len(lat))
    assert r["follows"].tolist() == [True, True, False, False, False, False, False]
    assert r["position"] == 11 / 14 and r["colour"] == 10 / 14 and r["shape"] == 10 / 14
    assert r["following_seen"] == pytest.approx(2 / 7) and np.isnan(r["following_held_out"])
    held = Scene((1, 2), ((0, 1), (3, 3)))  # a red disk: held out
    r = task.judge(_latent({1: (0, 1), 2: (3, 3)})[None], [held])
    assert r["following_held_out"] == 1.0 and held.held_out
    with pytest.raises(ValueError, match="channels"):
        task.decode(torch.zeros(1, 4, 16, 16))


def test_judge_tool_self_check_and_a_generated_file(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    tool = os.path.join(ROOT, "tools", "judge_compositional.py")
    r = subprocess.run([sys.executable, tool, "--self-check", "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["truth"] >= 0.98 and out["truth_held_out"] >= 0.98
    assert out["chance"] == 1 / (6 * 12 * 12) and out["shuffled"] <= 5 * out["chance"]
    # prompts -> latents (here the scenes rendered, as a perfect model would) -> the judge
    from safetensors.torch import load_file, save_file

    prompts = tmp_path / "prompts.safetensors"
    r = subprocess.run([sys.executable, tool, "--write-prompts", str(prompts), "--n", "4"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    p = load_file(str(prompts))
    assert p["prompt_embeds"].shape == (8, 16, 32) and p["scene_index"].shape == (8,)
    task = CompositionalTask(16, 16, 32, 32)
    lat = torch.stack([task.render(task.scenes[i], 16, 16) for i in p["scene_index"].tolist()])
    lat[0] = 0  # one sample misses
    save_file({"latents": lat}, str(tmp_path / "samples.safetensors"))
    r = subprocess.run([sys.executable, tool, str(tmp_path / "samples.safetensors"), "--scenes", str(prompts),
                        "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["following"] == 7 / 8 and out["following_seen"] == 3 / 4 and out["following_held_out"] == 1.0
    r = subprocess.run([sys.executable, tool, str(prompts)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "latents" in r.stderr


@pytest.mark.timeout(300)
def test_a_run_on_the_task_judges_its_samples_on_seen_and_held_out_captions(tmp_path):
    """pretrain_sd3.py --mock-task compositional: the sample grid's captions are --sample-num seen
    and as many held-out ones, judged into the metrics' samples row, and its latents are saved with
    their scenes for the judge tool, which reads them as the run did."""
    from safetensors.torch import load_file

    from _ranks import run_ranks

    m = tmp_path / "metrics.jsonl"
    logs = run_ranks("pretrain_sd3.py", 1, [
        "--config", "configs/sd3_light_tiny.toml", "--mock-task", "compositional", "--mock-latent-size", "16x16",
        "--train-iters", "2", "--lr-warmup-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--sample-interval", "2", "--sample-num", "3", "--sample-steps", "2", "--save", str(tmp_path / "ck"),
        "--metrics-file", str(m), "--no-progress"], timeout=240)
    assert "samples following their prompt: 0" in logs[0] and "of 6; chance 0.0012)" in logs[0], logs[0][-2000:]
    row = [r for r in map(json.loads, m.read_text().splitlines()) if r.get("type") == "samples"][-1]
    shares = ("prompt_following", "prompt_following_seen", "prompt_following_held_out", "object_position",
              "object_colour", "object_shape", "prompt_following_no_guidance")
    assert all(0 <= row[k] <= 1 for k in shares), row
    saved = load_file(str(tmp_path / "ck" / "samples" / "iter_0000002.safetensors"))
    assert saved["latents"].shape == (6, 16, 16, 16)
    task = CompositionalTask(16, 16, 32, 32)
    assert [task.scenes[i].held_out for i in saved["scene_index"].tolist()] == [False] * 3 + [True] * 3
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "judge_compositional.py"),
                        str(tmp_path / "ck" / "samples" / "iter_0000002.safetensors"), "--json"],
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=120)
    judged = json.loads(r.stdout)
    assert [judged[k] for k in ("following", "position", "colour", "shape")] == [
        row[k] for k in ("prompt_following", "object_position", "object_colour", "object_shape")]
