"""tools/generate.py with the local SD3 encoders and VAE, the CLIP score, tools/compare_runs.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from _data_fixtures import build_tiny_sd3_encoders  # noqa: E402
from _ranks import ROOT, one_process_env, run_script  # noqa: E402

GEN = os.path.join(ROOT, "tools", "generate.py")
COMPARE = os.path.join(ROOT, "tools", "compare_runs.py")
T5_LEN = 8
PROMPTS = ["a red cat on the mat", "the blue sky", "a small house in a tree"]


def _env():
    return one_process_env()


def _gen(*args):
    return run_script(GEN, args, env=_env(), timeout=300)


def _tiny_clip(root):
    """A tiny random transformers CLIPModel + CLIPProcessor (the tiny SD3 CLIP tokenizer), saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(root / "sd3" / "tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(root / "clip")
    return root / "clip"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny SD3 encoders/VAE, a tiny CLIP, and a weights-only checkpoint with EMA weights for the
    encoders' widths (T5 4096, pooled 2048, 77 + T5_LEN text tokens)."""
    from megatron_sd3.config import config_to_dict, make_config
    from megatron_sd3.convert import ensure_single_process_parallel_state
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.ema import EMA

    root = tmp_path_factory.mktemp("gen")
    build_tiny_sd3_encoders(root / "sd3")
    clip = _tiny_clip(root)
    ensure_single_process_parallel_state()
    cfg = make_config("tiny", num_layers=2, joint_attention_dim=4096, pooled_projection_dim=2048,
                      text_seq_len=77 + T5_LEN, zero_init_adaln=False, dual_attention_layers=[0])
    model = SD3Model(cfg)
    ema = EMA([model], 0.0)
    with torch.no_grad():
        for v in ema.shadow[0].values():
            v.mul_(0.5)  # EMA weights that differ from the model's
    ckpt.save_checkpoint(root / "ck", 0, [model], None, ema, None, consumed_samples=0, skipped_iters=0,
                         model_config=config_to_dict(cfg), run_config=None)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    raw = {k: v.detach().clone() for k, v in model.named_parameters()}
    return {"root": root, "ck": str(root / "ck"), "clip": str(clip), "model": model, "ema": ema, "raw": raw}


@pytest.mark.timeout(300)
def test_generate_prompts_writes_pngs_grid_and_clip_scores(setup):
    root = setup["root"]
    out = root / "out"
    r = _gen("--load", setup["ck"], "--prompts", str(root / "prompts.txt"), "--sd3-root", str(root / "sd3"),
             "--output-dir", str(out), "--output-latents", str(root / "lat.safetensors"), "--steps", "3",
             "--cfg-scale", "3", "--seed", "4", "--latent-size", "8x8", "--clip-model", setup["clip"], "--ema")
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(out / "0000.png").size == (64, 64)  # 8x8 latents, VAE scale factor 8
    grid = Image.open(out / "grid.png")
    assert grid.size == (128, 128)  # 3 images on a 2 x 2 grid
    assert list(Image.open(out / "0001.png").getdata()) == list(grid.crop((64, 0, 128, 64)).getdata())

    # the images are the VAE decode of the latents, as diffusers' SD3 pipeline decodes
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "sd3" / "vae").eval()
    lat = load_file(str(root / "lat.safetensors"))
    with torch.no_grad():
        x = vae.decode(lat["latents"] / vae.config.scaling_factor + vae.config.shift_factor).sample
    img = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    got = torch.from_numpy(__import__("numpy").asarray(Image.open(out / "0002.png"))).permute(2, 0, 1)
    assert torch.equal(got, img[2])

    # the latents: the sampler on the checkpoint's EMA weights with prompts encoded as preprocessing does
    from megatron_sd3.convert import ensure_single_process_parallel_state
    from megatron_sd3.data.preprocess import EncoderPaths, Encoders
    from megatron_sd3.sampling import sample, seeded_noise

    ensure_single_process_parallel_state()
    enc = Encoders(EncoderPaths.from_sd3_root(str(root / "sd3")), t5_len=T5_LEN)
    embeds, pooled = enc.encode_prompts(PROMPTS)
    model = setup["model"]
    setup["ema"].copy_to([model])
    ref = sample(model, embeds, pooled, seeded_noise(4, 3, (16, 8, 8)), steps=3, cfg_scale=3.0, shift=3.0)
    assert torch.allclose(lat["latents"], ref, rtol=1e-4, atol=1e-5)

    # CLIP score: per sample 100 * max(cos, 0), cos from CLIPModel's own forward; batch as torchmetrics
    from transformers import CLIPModel, CLIPProcessor

    summary = json.loads((out / "samples.json").read_text())
    clip, proc = CLIPModel.from_pretrained(setup["clip"]).eval(), CLIPProcessor.from_pretrained(setup["clip"])
    images = [Image.open(out / s["png"]) for s in summary["samples"]]
    inp = proc(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        cos = clip(**inp).logits_per_image.diagonal() / clip.logit_scale.exp()
    assert [s["prompt"] for s in summary["samples"]] == PROMPTS
    want = (100 * cos).clamp(min=0)
    assert torch.allclose(torch.tensor([s["clip_score"] for s in summary["samples"]]), want, atol=1e-3)
    assert summary["clip_score"] == pytest.approx(max(float((100 * cos).mean()), 0.0), abs=1e-3)


def test_clip_scorer_matches_clip_forward(setup):
    from transformers import CLIPModel, CLIPProcessor

    from megatron_sd3.clip_score import CLIPScorer, ClipModelError

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8) for _ in range(4)]
    prompts = ["a cat", "the dog on a mat", "red sky", "a tree"]
    scorer = CLIPScorer(setup["clip"])
    clip, proc = CLIPModel.from_pretrained(setup["clip"]).eval(), CLIPProcessor.from_pretrained(setup["clip"])
    inp = proc(text=prompts, images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt",
               padding=True)
    with torch.no_grad():
        cos = clip(**inp).logits_per_image.diagonal() / clip.logit_scale.exp()
    assert torch.allclose(scorer.cosines(images, prompts), cos, atol=1e-5) and bool((cos != 0).all())
    assert torch.allclose(scorer.scores(images, prompts), (100 * cos).clamp(min=0), atol=1e-3)
    assert scorer.score(images, prompts) == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    with pytest.raises(ClipModelError, match="no config.json"):
        CLIPScorer(setup["root"] / "nowhere")


@pytest.mark.timeout(300)
def test_generate_without_ema_and_errors(setup):
    """Without --ema: the checkpoint's own weights (the first test sampled its EMA weights)."""
    from megatron_sd3.convert import ensure_single_process_parallel_state
    from megatron_sd3.data.preprocess import EncoderPaths, Encoders
    from megatron_sd3.sampling import sample, seeded_noise

    root = setup["root"]
    common = ["--load", setup["ck"], "--prompts", str(root / "prompts.txt"), "--sd3-root", str(root / "sd3"),
              "--steps", "2", "--latent-size", "8x8", "--cfg-scale", "2", "--seed", "1"]
    r = _gen(*common, "--output-dir", str(root / "o2"), "--output-latents", str(root / "raw.safetensors"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(root / "raw.safetensors"))["latents"]
    ensure_single_process_parallel_state()
    enc = Encoders(EncoderPaths.from_sd3_root(str(root / "sd3")), t5_len=T5_LEN)
    embeds, pooled = enc.encode_prompts(PROMPTS)
    model, noise = setup["model"], seeded_noise(1, 3, (16, 8, 8))
    setup["ema"].copy_to([model])
    ema_ref = sample(model, embeds, pooled, noise, steps=2, cfg_scale=2.0, shift=3.0)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(setup["raw"][k])
    ref = sample(model, embeds, pooled, noise, steps=2, cfg_scale=2.0, shift=3.0)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5) and not torch.allclose(got, ema_ref, rtol=1e-2)

    r = _gen(*common, "--output-dir", str(root / "o4"), "--clip-model", str(root / "nowhere"))
    assert r.returncode == 2 and "--clip-model" in r.stderr and "no config.json" in r.stderr, r.stderr[-2000:]


def _write_metrics(path, gamma, evals=True):
    rows = []
    for it in range(1, 41):
        d = 1.0 / it + 0.1
        rows.append({"iteration": it, "loss": d + gamma * 0.5, "denoise_loss": d, "text_recon_loss": 0.5,
                     "lr": 1e-4})
        if evals and it % 10 == 0:
            ev = {"loss": d + 0.05, "denoise_loss": d + 0.05, "loss_at_t": {"0.25": d, "0.75": d + 0.2},
                  "clip_score": 20.0 + it / 10 + gamma}
            rows.append({"type": "eval", "iteration": it, **ev,
                         "ema": {**ev, "denoise_loss": d, "clip_score": ev["clip_score"] + 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"iteration\": 41, \"lo")  # a half-written line


def test_compare_runs_draws_both_runs(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path / "gamma0" / "metrics.jsonl", 0.0)
    _write_metrics(tmp_path / "g05" / "m.jsonl", 0.5)
    out = tmp_path / "cmp.png"
    r = subprocess.run([sys.executable, COMPARE, str(tmp_path / "gamma0"), str(tmp_path / "g05" / "m.jsonl"),
                        "--labels", "gamma 0,gamma 0.5", "--output", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size[0] > 800

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compare_runs

    runs = [("a", compare_runs.read_run(str(tmp_path / "gamma0" / "metrics.jsonl"))),
            ("b", compare_runs.read_run(str(tmp_path / "g05" / "m.jsonl")))]
    fig = compare_runs.plot_runs(runs, str(tmp_path / "again.png"))
    axes = {ax.get_title(): ax for ax in fig.axes}

    def line(title, label):
        ln = next(ln for ln in axes[title].lines if ln.get_label() == label)
        return list(ln.get_xdata()), list(ln.get_ydata())

    xs, ys = line("training loss (total)", "b")
    assert xs == list(range(1, 41)) and ys[0] == pytest.approx(1.1 + 0.25)
    assert line("training denoise loss", "b")[1][0] == pytest.approx(1.1)
    xs, ys = line("validation denoise loss (dashed: EMA)", "a")
    assert xs == [10, 20, 30, 40] and ys == pytest.approx([0.25, 0.2, 0.1 + 1 / 30 + 0.05, 0.175])
    assert line("validation denoise loss (dashed: EMA)", "a (EMA)")[1][0] == pytest.approx(0.2)
    xs, ys = line("validation loss per timestep t", "b t=0.75")
    assert xs == [10, 20, 30, 40] and ys == pytest.approx([0.4, 0.35, 0.1 + 1 / 30 + 0.2, 0.325])
    assert line("CLIP score (dashed: EMA)", "b")[1] == pytest.approx([21.5, 22.5, 23.5, 24.5])
    assert line("CLIP score (dashed: EMA)", "a (EMA)")[1] == pytest.approx([22.0, 23.0, 24.0, 25.0])

    r = subprocess.run([sys.executable, COMPARE, str(tmp_path / "nowhere"), "--output", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "neither a run directory nor a metrics file" in r.stderr
    r = subprocess.run([sys.executable, COMPARE, str(tmp_path / "gamma0"), "--labels", "x,y"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--labels has 2 names for 1 runs" in r.stderr


def test_compare_runs_legend_names_each_runs_weighting_scheme(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compare_runs

    for name, scheme in (("a", "cosmap"), ("b", None)):
        rows = [{"type": "train", "iteration": i, "loss": 1.0 / i, "denoise_loss": 1.0 / i,
                 **({"weighting_scheme": scheme} if scheme else {})} for i in range(1, 5)]
        rows.append({"type": "eval", "iteration": 4, "loss": 0.5, "denoise_loss": 0.5, "denoise_loss_weighted": 0.7,
                     "loss_at_t": {"0.5": 0.5}, **({"weighting_scheme": scheme} if scheme else {})})
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runs = [(n, compare_runs.read_run(str(tmp_path / f"{n}.jsonl"))) for n in ("a", "b")]
    fig = compare_runs.plot_runs(runs, str(tmp_path / "cmp.png"))
    labels = {ln.get_label() for ax in fig.axes for ln in ax.lines}
    assert {"a [cosmap]", "b", "a [cosmap] t=0.5"} <= labels and "a" not in labels


def test_compare_runs_over_a_sweep_gives_seed_intervals_and_paired_differences(tmp_path):
    """Fixed inputs, computed by hand: the mean and 95% Student-t interval over 3 seeds (t = 4.303
    at 2 degrees of freedom), and the paired difference against gamma 0 on the same seeds."""
    pytest.importorskip("matplotlib")
    import csv
    import math
    import statistics

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compare_runs

    den = {"text_recon_gamma=0": [0.55, 0.6, 0.7], "text_recon_gamma=1__text_recon_target_layer=0": [0.5, 0.7, 0.6]}
    acc = {"text_recon_gamma=0": [0.75, 0.8, 0.7], "text_recon_gamma=1__text_recon_target_layer=0": [0.8, 0.9, 0.85]}
    cells = []
    for cell, values in den.items():
        for s, (d, a) in enumerate(zip(values, acc[cell])):
            name = f"{cell}__seed={1234 + s}"
            cells.append(name)
            (tmp_path / name).mkdir()
            rows = [{"type": "train", "iteration": 10, "loss": 1.0},
                    {"type": "eval", "iteration": 5, "denoise_loss": 9.0, "loss_at_t": {"0.25": 9.0}},
                    {"type": "eval", "iteration": 10, "denoise_loss": d, "text_recon_loss": 0.01 * (s + 1),
                     "loss_at_t": {"0.25": d + 0.1, "0.75": d - 0.1}},
                    {"type": "samples", "iteration": 10, "prompt_following": a, "prompt_following_no_guidance": a - 0.1}]
            if "gamma=1" in cell:  # --log-text-grad-norms: only where the recon term is on
                rows[2]["text_recon_grad_ratio"] = 0.1 * (s + 1)
            (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            (tmp_path / name / "done").write_text("{}\n")
    # a fourth seed stopped midway (no ``done``): its rows are not final, it is left out
    cells.append("text_recon_gamma=0__seed=1237")
    (tmp_path / cells[-1]).mkdir()
    (tmp_path / cells[-1] / "metrics.jsonl").write_text(json.dumps(
        {"type": "eval", "iteration": 5, "denoise_loss": 9.0, "loss_at_t": {"0.25": 9.0}}) + "\n")
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": cells}))
    rows = compare_runs.summarize_sweep(str(tmp_path))
    get = {(r["cell"], r["metric"]): r for r in rows}
    r = get[("text_recon_gamma=1,text_recon_target_layer=0", "denoise_loss")]
    xs = den["text_recon_gamma=1__text_recon_target_layer=0"]
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.6)
    assert r["ci95"] == pytest.approx(4.303 * statistics.stdev(xs) / math.sqrt(3))
    diffs = [a - b for a, b in zip(xs, den["text_recon_gamma=0"])]
    assert r["diff"] == pytest.approx(statistics.mean(diffs)) and r["n_paired"] == 3
    assert r["diff_ci95"] == pytest.approx(4.303 * statistics.stdev(diffs) / math.sqrt(3))
    base = get[("text_recon_gamma=0", "prompt_following")]
    assert base["mean"] == pytest.approx(0.75) and math.isnan(base["diff"]) and base["n"] == 3
    assert get[("text_recon_gamma=0", "denoise_loss")]["n"] == 3
    assert get[("text_recon_gamma=0", "loss_at_t/0.75")]["mean"] == pytest.approx(statistics.mean(den["text_recon_gamma=0"]) - 0.1)
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, COMPARE, str(tmp_path), "--output-dir", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    table = (out / "sweep.md").read_text()
    assert "| text_recon_gamma=1,text_recon_target_layer=0 | 3 | 0.6 ± 0.25 (-0.01667 ± 0.26)" in table
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert Image.open(out / "sweep_accuracy.png").size[0] > 400 and (out / "sweep_loss_at_t.png").exists()
    assert get[("text_recon_gamma=1,text_recon_target_layer=0", "text_recon_grad_ratio")]["mean"] == pytest.approx(0.2)
    assert (out / "sweep_grad_ratio.png").exists() and ("text_recon_gamma=0", "text_recon_grad_ratio") not in get
    # a row per cell and seed, every finished cell's rows in one JSONL, and the same tables from it
    with open(out / "cells.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 6 and per_seed[0]["text_recon_gamma"] == "0" and per_seed[0]["seed"] == "1234"
    assert float(per_seed[4]["denoise_loss"]) == 0.7 and per_seed[0]["text_recon_target_layer"] == ""
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 4 and json.loads(lines[0])["cell"] == "text_recon_gamma=0__seed=1234"
    again = tmp_path / "again"
    again.mkdir()
    (again / "cells.jsonl").write_text((out / "cells.jsonl").read_text())
    res = subprocess.run([sys.executable, COMPARE, str(again / "cells.jsonl")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (again / "sweep.md").read_text() == table and (again / "cells.csv").read_text() == (out / "cells.csv").read_text()
