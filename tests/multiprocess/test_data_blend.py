"""Dataset blends (Megatron-LM's ``--data-path 0.7 A 0.3 B``, megatron_sd3/data/blend.py): the drawn
shares, one data order under every data-parallel layout, training and a bit-exact resume through
pretrain_sd3.py, the blend recorded in the checkpoint and a changed blend refused in one line."""
import json

import numpy as np
import pytest
import torch

from _ranks import run_ranks

from megatron_sd3.data.blend import BlendedDataset, BlendError, blend_counts, parse_blend
from megatron_sd3.data.mock import MockDataset
from megatron_sd3.data.sampler import build_data_iterator


def test_parse_blend_forms_and_errors():
    assert parse_blend(["A"]) == [(1.0, "A")]
    assert parse_blend(["7", "A", "3", "B"]) == [(0.7, "A"), (0.3, "B")]
    assert parse_blend("0.5 A 0.5 B") == [(0.5, "A"), (0.5, "B")]
    for bad, msg in ((["0.7", "A", "0.3"], "weight-path pairs"), (["x", "A", "0.3", "B"], "'x' is not a weight"),
                     (["0", "A", "1", "B"], "must be > 0"), (["0.5", "A", "0.5", "A"], "appears twice")):
        with pytest.raises(BlendError, match=msg):
            parse_blend(bad)
    assert blend_counts([1000, 1000], [0.7, 0.3]) == [2334, 1000]  # the 0.3 part is seen once per blend epoch


def _parts(seed=5):
    a = MockDataset(1000, latent_size=[(4, 4), (4, 2)], in_channels=2, text_len=2, text_dim=4, pooled_dim=3, seed=seed)
    b = MockDataset(1000, latent_size=(4, 4), in_channels=2, text_len=2, text_dim=4, pooled_dim=3, seed=seed + 1)
    return a, b


def test_drawn_share_and_the_same_order_under_dp2():
    a, b = _parts()
    ds = BlendedDataset([a, b], [0.7, 0.3], seed=1, names=["A", "B"])
    assert ds.buckets == [(4, 4), (4, 2)]
    G = 8
    one = build_data_iterator(ds, G, 2, 0, 1, seed=3, prefetch=0)
    drawn = [next(one) for _ in range(2000 // 2)]
    idx = torch.cat([m["sample_index"] for m in drawn]).numpy()
    share = ds.drawn(idx)[0] / len(idx)
    assert abs(share - 0.7) <= 0.05, share
    # every global batch stays in one latent size, and a sample's tensors are its part's
    for m in drawn[:50]:
        for j, i in enumerate(m["sample_index"].tolist()):
            d, k = ds.source(i)
            assert torch.equal(m["latents"][j], (a, b)[d][k]["latents"])
    # DP=2: rank 0's then rank 1's microbatches of each global batch are the one-process batch
    ranks = [build_data_iterator(ds, G, 2, r, 2, seed=3, prefetch=0) for r in range(2)]
    for k in range(100):
        single = torch.cat([drawn[k * 4 + m]["sample_index"] for m in range(4)])
        dp = torch.cat([next(ranks[r])["sample_index"] for r in range(2) for _ in range(2)])
        assert torch.equal(single, dp), k


def test_get_batch_is_the_stacked_samples_with_masks_completed():
    a = MockDataset(20, latent_size=(4, 4), in_channels=2, text_len=2, text_dim=4, pooled_dim=3, with_mask=True)
    b = MockDataset(30, latent_size=(4, 4), in_channels=2, text_len=2, text_dim=4, pooled_dim=3, seed=9)
    ds = BlendedDataset([a, b], [0.5, 0.5], seed=0)
    idx = [0, 45, 3, 31, 59]
    got = ds.get_batch(idx)
    for j, i in enumerate(idx):
        want = ds[i]
        assert torch.equal(got["latents"][j], want["latents"])
        assert torch.equal(got["mask"][j], want.get("mask", torch.ones(4, 4)))


# -- through pretrain_sd3.py ---------------------------------------------------------------------------
BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8",
        "--global-batch-size", "8", "--micro-batch-size", "2"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    from megatron_sd3.data.shards import write_dataset

    root = tmp_path_factory.mktemp("blend")
    for name, n, seed in (("A", 48, 1), ("B", 40, 2)):
        write_dataset(MockDataset(n, latent_size=(8, 8), in_channels=16, text_len=16, text_dim=32, pooled_dim=32,
                                  seed=seed), root / name, shard_size=16)
    return root


def _rows(path):
    with open(path) as fh:
        return {r["iteration"]: r for r in map(json.loads, fh) if r.get("type", "train") == "train"}


@pytest.mark.timeout(600)
def test_blend_trains_pp2_and_resumes_bit_exact(two_datasets, tmp_path, capsys, monkeypatch):
    blend = ["--data-path", "0.7", str(two_datasets / "A"), "0.3", str(two_datasets / "B")]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    ck = tmp_path / "ck"
    valid = ["--valid-data-path", "0.5", str(two_datasets / "A"), "0.5", str(two_datasets / "B"),
             "--eval-interval", "6", "--eval-timesteps", "1"]
    logs = run_ranks("pretrain_sd3.py", 2, [*BASE, *pp2, *blend, *valid, "--train-iters", "6", "--save", str(ck),
                                            "--save-interval", "3", "--metrics-file", str(tmp_path / "full.jsonl")],
                     timeout=300)
    # the validation blend: 48 + 48 samples (B's 40 cycled up to its half), evaluated at the end
    assert (f" > validation: 96 samples x 1 timesteps (--valid-data-path 0.5 {two_datasets / 'A'} 0.5 "
            f"{two_datasets / 'B'})") in logs[0]
    full = _rows(tmp_path / "full.jsonl")
    common = torch.load(next((ck / "iter_0000003").glob("common.pt")), weights_only=False)
    assert [(d["weight"], d["num_samples"]) for d in common["common"]["data_blend"]] == [(0.7, 48), (0.3, 40)]
    counts = [full[it]["dataset_samples"] for it in range(1, 7)]
    assert all(sum(c.values()) == 8 for c in counts) and list(counts[0]) == [str(two_datasets / n) for n in "AB"]
    drawn_a = sum(c[str(two_datasets / "A")] for c in counts)
    assert 0.5 <= drawn_a / 48 <= 0.9  # 0.7 of 48 drawn samples, give or take the shuffle
    logs = run_ranks("pretrain_sd3.py", 2, [*BASE, *pp2, *blend, "--train-iters", "6", "--load", str(ck),
                                            "--ckpt-step", "3", "--metrics-file", str(tmp_path / "res.jsonl")],
                     timeout=300)
    assert "resumed from" in logs[0]
    resumed = _rows(tmp_path / "res.jsonl")
    for it in (4, 5, 6):
        for k in ("loss", "denoise_loss", "text_recon_loss", "dataset_samples"):
            assert resumed[it][k] == full[it][k], (it, k)
    # a changed blend on resume: one line, before any rank starts
    from megatron_sd3.training.pretrain import main

    other = ["--data-path", "0.5", str(two_datasets / "A"), "0.5", str(two_datasets / "B")]
    monkeypatch.setenv("WORLD_SIZE", "1")
    capsys.readouterr()
    code = main([*BASE, *other, "--train-iters", "6", "--load", str(ck), "--check-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "the checkpoint was trained on the blend --data-path 0.7" in err[0] and "resume with the checkpoint's blend" in err[0]
    # every dataset of a blend is verified before any rank starts
    missing = ["--data-path", "0.5", str(two_datasets / "A"), "0.5", str(tmp_path / "nowhere")]
    code = main([*BASE, *missing, "--train-iters", "6", "--check-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "nowhere") in err[0], err
