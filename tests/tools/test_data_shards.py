"""Shard format, manifest, verify, and the lazy sharded dataset (no encoders needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sd3.data import MockDataset, ShardedDataset, ShardError, build_data_iterator, verify
from megatron_sd3.data.shards import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mockset(tmp_path):
    src = MockDataset(40, [(4, 4), (2, 8)], in_channels=16, text_len=9, text_dim=32, pooled_dim=12,
                      with_mask=True, seed=2)
    m = write_dataset(src, tmp_path / "ds", shard_size=8)
    return src, tmp_path / "ds", m


def test_roundtrip_bf16_and_manifest(mockset):
    src, root, m = mockset
    ds = ShardedDataset(root, verify="full")
    assert len(ds) == 40 and m["num_samples"] == 40 and m["dtype"] == "bfloat16"
    for e in m["shards"]:
        assert len(e["sha256"]) == 64 and e["bytes"] > 0 and set(e["tensors"]) >= {"latents", "prompt_embeds"}
    from safetensors import safe_open
    seen = 0
    for s, e in enumerate(m["shards"]):
        with safe_open(str(root / e["file"]), "pt") as f:
            idx = json.loads(f.metadata()["input_indices"])
        for row, i in enumerate(idx):
            got = ds[seen + row]
            want = src[i]
            assert got["latents"].dtype == torch.bfloat16
            for k in want:
                assert torch.equal(got[k], want[k].to(torch.bfloat16)), k
            assert ds.bucket_ids[seen + row] == src.bucket_ids[i]
        seen += len(idx)
    assert ds.get(3, ("latents",)).keys() == {"latents"}


def test_lru_bounds_open_handles(mockset):
    _, root, m = mockset
    ds = ShardedDataset(root, max_open_shards=2)
    for i in range(len(ds)):
        ds[i]
    assert len(ds._handles) <= 2


def _corrupt_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named(mockset):
    _, root, m = mockset
    bad = root / m["shards"][1]["file"]
    _corrupt_byte(bad)
    verify(root, fast=True)  # same size, same header: only the checksum sees it
    with pytest.raises(ShardError, match=f"{bad.name}.*sha256 mismatch"):
        verify(root)
    with pytest.raises(ShardError, match=bad.name):
        ShardedDataset(root, verify="full")


def test_truncated_missing_and_garbage_shards(mockset):
    _, root, m = mockset
    p = root / m["shards"][0]["file"]
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=f"{p.name}.*size"):
        verify(root, fast=True)
    p.write_bytes(b"\xff" * len(data))
    with pytest.raises(ShardError, match=f"{p.name}.*header"):
        verify(root, fast=True)
    p.unlink()
    with pytest.raises(ShardError, match=f"{p.name}: missing"):
        ShardedDataset(root)
    # verify=None defers the check to the first read of that shard, still naming it
    ds = ShardedDataset(root, verify=None)
    with pytest.raises(ShardError, match=p.name):
        ds[0]
    (root / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.*missing"):
        ShardedDataset(root)


def test_verify_cli(mockset):
    _, root, m = mockset
    cmd = [sys.executable, "-m", "megatron_sd3.data", str(root)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and "ok: 40 samples" in r.stdout
    _corrupt_byte(root / m["shards"][2]["file"])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and m["shards"][2]["file"].split("/")[-1] in r.stderr


def test_iterator_over_shards_resumes_exactly(mockset):
    _, root, _ = mockset
    ds = ShardedDataset(root)
    full = [next(it) for it in [build_data_iterator(ds, 4, 2, 1, 2, seed=9)] for _ in range(12)]
    it = build_data_iterator(ds, 4, 2, 1, 2, seed=9, consumed_samples=4 * 5)
    for a in full[5:]:
        b = next(it)
        assert all(torch.equal(a[k], b[k]) for k in a)
    it.close()


def _preflight(capsys, *argv):
    from megatron_sd3.training.pretrain import main

    code = main(["--check-config", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_deleted_shard_is_one_line_at_preflight(mockset, capsys):
    _, root, m = mockset
    # the mock's pooled width (12) is not the tiny model's (32): give the model the data's widths
    fit = ["--data-path", str(root), "--pooled-projection-dim", "12"]
    assert _preflight(capsys, *fit)[0] == 0, capsys.readouterr()
    shard = root / m["shards"][3]["file"]
    shard.unlink()
    code, err = _preflight(capsys, *fit)
    assert code == 2 and "\n" not in err, err
    assert f"shard {shard}: missing; re-run tools/preprocess_data.py" in err
    # a read after the start (a shard deleted mid-run) says the same
    ds = ShardedDataset(root, verify=None)
    i = sum(e["num_samples"] for e in m["shards"][:3])
    with pytest.raises(ShardError, match=f"{shard.name}: missing; re-run tools/preprocess_data.py"):
        ds[i]


def test_data_that_does_not_fit_the_model_is_one_line_at_preflight(tmp_path, capsys, monkeypatch):
    src = MockDataset(8, [(4, 4)], in_channels=4, text_len=9, text_dim=24, pooled_dim=32, seed=2)
    root = tmp_path / "ds"
    write_dataset(src, root, shard_size=8)
    code, err = _preflight(capsys, "--data-path", str(root))
    assert code == 2 and "\n" not in err, err
    assert f"data {root / 'manifest.json'} does not fit the model" in err
    assert "text_dim 24 vs the model's joint_attention_dim = 32" in err
    assert "latent_channels 4 vs the model's in_channels = 16" in err
    assert "set [model] joint_attention_dim = 24, in_channels = 4" in err
    assert "text_len" not in err  # a single stage takes any text length
    fit = ["--data-path", str(root), "--joint-attention-dim", "24", "--in-channels", "4"]
    assert _preflight(capsys, *fit)[0] == 0
    # pipeline stages need the declared text length (tiny: 16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _preflight(capsys, *fit, "--pipeline-model-parallel-size", "2")
    assert code == 2 and "\n" not in err, err
    assert "text_len 9 vs the model's text_seq_len = 16 (pipeline stages" in err
    assert "set [model] text_seq_len = 9" in err
