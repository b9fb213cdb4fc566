"""End to end: tiny encoders + a dozen images (one corrupt) -> 2-process preprocessing -> verified dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sd3.data import ShardedDataset, build_data_iterator, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _data_fixtures import build_tiny_sd3_encoders, make_image_folder, train_pp2_on  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"
COMMON = ["--resolution", "64", "--buckets", "64x64,96x48,48x96", "--t5-len", "16", "--shard-size", "3",
          "--batch-size", "2", "--mask-suffix", "_mask"]


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    enc = build_tiny_sd3_encoders(base / "sd3")
    imgs = make_image_folder(base / "images", n=12, corrupt=(5,), masks=True)
    out = base / "data"
    procs = [subprocess.Popen([sys.executable, str(TOOL), "--input", str(imgs), "--output", str(out),
                               "--sd3-root", str(enc), *COMMON],
                              env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=150)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return {"enc": enc, "imgs": imgs, "out": out, "logs": logs}


@pytest.mark.timeout(200)
def test_two_ranks_write_a_verified_manifest(prepared):
    out, logs = prepared["out"], prepared["logs"]
    assert "[preprocess rank 1] unit 1 " in logs[1] and "[preprocess rank 0] unit 2 " in logs[0]
    assert "wrote" in logs[0] and "manifest" not in logs[1]
    m = verify(out)  # sizes, headers and sha256 of every shard
    assert m["num_samples"] == 11 and m["num_skipped"] == 1
    assert m["skipped"][0]["path"].endswith("img005.jpg") and m["skipped"][0]["reason"]
    assert m["buckets"] == [[96, 48], [64, 64], [48, 96]] and m["latent_buckets"] == [[12, 6], [8, 8], [6, 12]]
    assert (m["text_len"], m["text_dim"], m["pooled_dim"], m["latent_channels"]) == (93, 4096, 2048, 16)
    assert m["encoders"]["shift_factor"] == pytest.approx(0.0609) and m["encoders"]["t5_len"] == 16
    assert m["preprocess"]["world_size"] == 2
    files = {e["file"] for e in m["shards"]}
    assert any(f.startswith("shards/u000001") for f in files) and any(f.startswith("shards/u000002") for f in files)
    with_mask = 0
    for e in m["shards"]:
        h, w = m["latent_buckets"][e["bucket"]]
        assert e["tensors"]["latents"] == {"shape": [16, h, w], "dtype": "bfloat16"}
        assert e["tensors"]["prompt_embeds"]["shape"] == [93, 4096]
        with_mask += "mask" in e["tensors"]
    assert with_mask >= 1


@pytest.mark.timeout(120)
def test_values_equal_the_diffusers_pipeline(prepared):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors import safe_open

    from megatron_sd3.data import preprocess as pp

    enc = pp.Encoders(pp.EncoderPaths.from_sd3_root(str(prepared["enc"])), "cpu", torch.float32, t5_len=16)
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=enc.vae,
        text_encoder=enc.clip_l, tokenizer=enc.tok_l, text_encoder_2=enc.clip_g, tokenizer_2=enc.tok_g,
        text_encoder_3=enc.t5, tokenizer_3=enc.tok_t5)
    out = prepared["out"]
    m = json.loads((out / "manifest.json").read_text())
    entry = max(m["shards"], key=lambda e: e["num_samples"])
    with safe_open(str(out / entry["file"]), "pt") as f:
        meta = f.metadata()
        caps, srcs, idx = (json.loads(meta[k]) for k in ("captions", "sources", "input_indices"))
        emb, pooled, lat = f.get_tensor("prompt_embeds"), f.get_tensor("pooled_prompt_embeds"), f.get_tensor("latents")
    pe, _, ppe, _ = pipe.encode_prompt(caps, caps, caps, device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=16)
    assert torch.equal(emb, pe.to(torch.bfloat16)) and torch.equal(pooled, ppe.to(torch.bfloat16))
    # latents: (draw - shift) * scale of the VAE posterior, draw keyed by (seed, input index)
    from PIL import Image
    img = pp.load_image(srcs[0])
    H, W = m["buckets"][entry["bucket"]]
    px = pp.image_to_tensor(pp.resize_crop(img, H, W, Image.Resampling.LANCZOS))[None]
    with torch.no_grad():
        dist = enc.vae.encode(px).latent_dist
    g = torch.Generator().manual_seed(pp._seed_for(0, idx[0]))
    z = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=g)
    want = (z - enc.vae.config.shift_factor) * enc.vae.config.scaling_factor
    torch.testing.assert_close(lat[0].float(), want[0], atol=2e-2, rtol=1e-2)


@pytest.mark.timeout(120)
def test_restart_redoes_only_unfinished_units(prepared, tmp_path):
    from megatron_sd3.data import preprocess as pp

    out = prepared["out"]
    before = json.loads((out / "manifest.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    victim = next(e for e in before["shards"] if e["file"].startswith("shards/u000001"))
    (out / victim["file"]).unlink()  # as if rank 1 died while writing unit 1
    cfg = pp.PreprocessConfig(input=str(prepared["imgs"]), output=str(out),
                              encoders=pp.EncoderPaths.from_sd3_root(str(prepared["enc"])), resolution=64,
                              buckets="64x64,96x48,48x96", t5_len=16, shard_size=3, batch_size=2,
                              mask_suffix="_mask", quiet=True)
    after = pp.run(cfg, rank=0, world_size=1)
    redone = {p.name for p in (out / "shards").iterdir() if mtimes.get(p.name) != p.stat().st_mtime_ns}
    assert redone and all(n.startswith("u000001") for n in redone)
    strip = lambda e: {k: v for k, v in e.items() if k != "sha256"}  # noqa: E731 (thread count may change bits)
    assert [strip(e) for e in after["shards"]] == [strip(e) for e in before["shards"]]
    kept = lambda m: [e for e in m["shards"] if not e["file"].startswith("shards/u000001")]  # noqa: E731
    assert kept(after) == kept(before)
    verify(out)
    cfg.t5_len = 8
    with pytest.raises(pp.InputError, match="other settings.*t5_len"):
        pp.run(cfg, rank=0, world_size=1)


@pytest.mark.timeout(60)
def test_missing_encoder_is_a_one_line_error(prepared, tmp_path):
    enc = prepared["enc"]
    r = subprocess.run([sys.executable, str(TOOL), "--input", str(prepared["imgs"]), "--output", str(tmp_path / "o"),
                        "--vae", str(tmp_path / "nope"), "--clip-l", str(enc / "text_encoder"),
                        "--clip-g", str(enc / "text_encoder_2"), "--t5", str(enc / "text_encoder_3")],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "VAE" in r.stderr and "nope" in r.stderr, r.stderr


def test_loader_over_preprocessed_data(prepared):
    ds = ShardedDataset(prepared["out"], verify="full")
    assert len(ds) == 11
    G, mbs, dp = 2, 1, 2
    its = [build_data_iterator(ds, G, mbs, r, dp, seed=4) for r in range(dp)]
    stream = []
    for k in range(8):
        mbs_k = [next(it) for it in its]
        assert len({tuple(b["latents"].shape) for b in mbs_k}) == 1  # one bucket per global batch
        assert mbs_k[0]["latents"].dtype == torch.bfloat16
        stream.append(mbs_k)
    from megatron_sd3.data.sampler import collate
    for k in range(8):  # batched positional reads == stacking single samples (mask completion included)
        for b in stream[k]:
            ref = collate([ds.get(int(i)) for i in b["sample_index"]], b["sample_index"].tolist())
            assert set(ref) == set(b) and all(torch.equal(ref[x], b[x]) for x in b)
    assert any("mask" in b for row in stream for b in row) and any("mask" not in b for row in stream for b in row)
    for b in range(len(ds.buckets)):  # one read of a whole bucket, masked and unmasked samples mixed
        idx = [i for i in range(len(ds)) if ds.bucket_ids[i] == b]
        got, ref = ds.get_batch(idx), collate([ds.get(i) for i in idx], idx)
        assert set(got) == set(ref) - {"sample_index"} and all(torch.equal(got[x], ref[x]) for x in got)
        if b == 1:
            has = [("mask" in ds.get(i)) for i in idx]
            assert any(has) and not all(has) and (got["mask"][[not h for h in has]] == 1).all()
    resumed = [build_data_iterator(ds, G, mbs, r, dp, seed=4, consumed_samples=3 * G) for r in range(dp)]
    for k in range(3, 8):
        for r in range(dp):
            b = next(resumed[r])
            assert set(b) == set(stream[k][r]) and all(torch.equal(b[x], stream[k][r][x]) for x in b)
    for it in its + resumed:
        it.close()


@pytest.mark.timeout(300)
def test_pretrain_pp2_from_the_preprocessed_data(prepared, tmp_path):
    """The two README commands: preprocess (the fixture), then pretrain_sd3.py --data-path, PP=2."""
    rows = train_pp2_on(prepared["out"], tmp_path, 4)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["text_recon_loss"] > 0 for r in rows)
