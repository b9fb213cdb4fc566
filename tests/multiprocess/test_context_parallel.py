"""Context parallelism's attention (models/context_parallel.py) on CPU (gloo) ranks, in float64.

The Ulysses all-to-all moves values, and the attention of each head then runs on the same
numbers as in one process: outputs and input gradients agree to float64 rounding (1e-12 is some
thousand times above it). The gradient of the replicated text is the sum of the ranks' shares;
broken on purpose (the text's all-gather over heads with a split instead of a reduce-scatter
backward, or a share not divided by CP) it is off by 10% and more.
"""
import pytest
import torch

from _ranks import run_ranks

WORKER = "tests/_cp_attention_worker.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ulysses_joint_attention_matches_one_process(tmp_path, nproc):
    run_ranks(WORKER, nproc, ["--out", str(tmp_path)], timeout=100)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    ref = ranks[0]
    s_img = 12
    text_grads = [torch.zeros_like(g[s_img:]) for g in ref["ref_grads"]]
    for res in ranks:
        r, n = res["rank"], res["n"]
        own = list(range(r * n, (r + 1) * n)) + list(range(s_img, ref["ref_out"].shape[0]))
        torch.testing.assert_close(res["out"], ref["ref_out"][own], rtol=0, atol=1e-12)
        for i, g in enumerate(res["grads"]):
            torch.testing.assert_close(g[:n], ref["ref_grads"][i][r * n:(r + 1) * n], rtol=0, atol=1e-12)
            text_grads[i] += g[n:]
    for got, want in zip(text_grads, ref["ref_grads"]):
        torch.testing.assert_close(got, want[s_img:], rtol=0, atol=1e-12)


# -- pretrain_sd3.py end to end -----------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8"]
CP2 = ["--context-parallel-size", "2"]


def _train(tmp, name, nproc, args, timeout=300):
    m = os.path.join(tmp, f"{name}.jsonl")
    logs = run_ranks("pretrain_sd3.py", nproc, [*BASE, *args, "--metrics-file", m], timeout=timeout)
    with open(m) as fh:
        return {r["iteration"]: r for r in map(json.loads, fh)}, logs


def checkpoint_state(d, out):
    """Everything a checkpoint folder restores, layout-free: its tensors and objects by key (model,
    EMA, optimizer, RNG; read with torch's DCP converter) and its common state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(d, out)
    return torch.load(out, weights_only=False), torch.load(os.path.join(d, "common.pt"), weights_only=False)


def _assert_same_state(a, b):
    (ta, ca), (tb, cb) = a, b
    assert sorted(ta) == sorted(tb) and ca == cb
    for key, va in ta.items():
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, tb[key]), key
        elif key.startswith("rng_state"):  # [{"random": ..., "np": ..., "torch": ...}]
            (ra,), (rb,) = va, tb[key]
            assert ra["random"] == rb["random"] and torch.equal(ra["torch"], rb["torch"]), key
            assert all(np.array_equal(x, y) for x, y in zip(ra["np"], rb["np"])), key


@pytest.mark.timeout(600)
def test_a_cp2_checkpoint_resumes_under_cp2_bit_exact_and_under_cp1(tmp_path):
    """CP=2 trains 6 iterations, saving at 4. Resumed from 4 under CP=2, every later loss is the
    uninterrupted run's to the bit. Under CP=1 the same checkpoint loads (parameters and optimizer
    state are replicated over CP, so nothing is resharded) with every bit of its state: saved again
    at once by the CP=1 process, it is the CP=2 checkpoint, tensor for tensor (weights, EMA, Adam
    moments, RNG states, iteration, samples consumed, scheduler). Trained on from there, the losses
    are CP=1's arithmetic on that state: CP=2's up to the rounding of a layout change (the
    weight-gradient sums over tokens are split in two and added by the all-reduce, so no bit
    equality is promised after the first update), held to 1e-5 as the other reshards."""
    tmp = str(tmp_path)
    ck = os.path.join(tmp, "ck")
    full, logs = _train(tmp, "full", 2, [*CP2, "--train-iters", "6", "--save", ck, "--save-interval", "4"])
    assert "world size 2 = TP 1 x PP 1 x CP 2 x DP 1" in logs[0]
    at4 = ["--train-iters", "6", "--load", ck, "--ckpt-step", "4"]
    resumed, logs = _train(tmp, "cp2", 2, [*CP2, *at4])
    assert "resumed from" in logs[0]
    for it in (5, 6):
        for k in ("loss", "denoise_loss", "text_recon_loss", "lr", "grad_norm"):
            assert resumed[it][k] == full[it][k], (it, k, resumed[it][k], full[it][k])
    # CP=1 loads iteration 4 and, with no iteration left to run, saves what it holds
    resaved = os.path.join(tmp, "ck1")
    _, logs = _train(tmp, "resave", 1, ["--train-iters", "4", "--load", ck, "--ckpt-step", "4", "--save", resaved])
    assert "resumed from" in logs[0] and "differs from this run's" not in logs[0]
    _assert_same_state(checkpoint_state(os.path.join(ck, "iter_0000004"), os.path.join(tmp, "cp2.pt")),
                       checkpoint_state(os.path.join(resaved, "iter_0000004"), os.path.join(tmp, "cp1.pt")))
    single, logs = _train(tmp, "cp1", 1, at4)
    assert "resumed from" in logs[0]
    for it in (5, 6):
        for k in ("loss", "denoise_loss", "text_recon_loss"):
            assert abs(single[it][k] - full[it][k]) <= 1e-5 * abs(full[it][k]), (it, k, single[it], full[it])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, args, message", [
    ("8", ["--tensor-model-parallel-size", "2", "--context-parallel-size", "4"],
     "num_attention_heads 4 is not divisible by tensor-model-parallel-size x context-parallel-size = 2 x 4"),
    ("3", CP2, "world size 3 is not divisible by TP x PP x CP = 1 x 1 x 2"),
    ("2", [*CP2, "--mock-latent-size", "6x6"], "splits the 9 image tokens of a latent bucket over "
                                               "context-parallel-size 2"),
    ("4", [*CP2, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--mock-latent-size", "6x4"],
     "splits the 6 image tokens of a latent bucket over context-parallel-size 2 x tensor-model-parallel-size 2"),
    ("2", [*CP2, "--transformer-impl", "transformer_engine"], "runs on --transformer-impl local"),
])
def test_a_layout_context_parallelism_cannot_split_is_one_line(world, args, message, capsys, monkeypatch):
    from megatron_sd3.training.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", world)
    try:
        code = main(["--config", "configs/sd3_light_tiny.toml", *args])
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
