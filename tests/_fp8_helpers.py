"""Helpers for tests/unit/test_fp8.py: the torchao FP8 linear pair and the TP=2 worker started by
torch.multiprocessing.spawn (kept in a module so spawn can import it).

The pair is ``megatron_sd3.testing.helpers.build_fp8_pair`` (also used by tools/fp8_gpu_check.py):
full master weights built on CPU and split over TP, no fused wgrad, no sequence parallelism.
"""

from __future__ import annotations

import os

import torch

from megatron_sd3.testing.helpers import build_fp8_pair

HIDDEN = 64
FFN = 128


def full_weights(seed: int = 0, hidden: int = HIDDEN, ffn: int = FFN):
    """Full (unsplit) weights of the column -> row pair, deterministic."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(ffn, hidden, generator=g) * 0.08,
        "b1": torch.randn(ffn, generator=g) * 0.02,
        # uneven magnitudes over the output features so the TP shards have different amax
        "w2": torch.randn(hidden, ffn, generator=g) * 0.05 * torch.linspace(0.3, 2.0, ffn),
        "b2": torch.randn(hidden, generator=g) * 0.02,
    }


def pair_forward(col, row, x):
    h, _ = col(x)
    h = torch.nn.functional.gelu(h, approximate="tanh")
    y, _ = row(h)
    return y


def run_pair(col, row, x, grad_y, settings=None):
    """Forward + backward (optionally under fp8_context); returns output and local grads."""
    from megatron_sd3.backends.torchao import fp8_context

    x = x.detach().clone().requires_grad_(True)
    for p in (col.weight, col.bias, row.weight, row.bias):
        p.grad = None
    ctx = fp8_context(True, settings=settings) if settings is not None else fp8_context(False)
    with ctx:
        y = pair_forward(col, row, x)
        y.backward(grad_y)
    return {
        "y": y.detach().float(),
        "dx": x.grad.detach().float(),
        "dw1": col.weight.grad.detach().float(),
        "db1": col.bias.grad.detach().float(),
        "dw2": row.weight.grad.detach().float(),
        "db2": row.bias.grad.detach().float(),
    }


def tp_worker(rank: int, world_size: int, port: int, out_dir: str, fmt: str) -> None:
    """TP=world_size: FP8 with and without the amax all-reduce; saves this rank's results."""
    torch.set_num_threads(1)
    from megatron_sd3.backends import Fp8Settings
    from megatron_sd3.distributed import destroy_distributed, initialize_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    initialize_distributed(tp=world_size)
    try:
        weights = full_weights()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 2, HIDDEN, generator=g)
        grad_y = torch.randn(32, 2, HIDDEN, generator=g)
        col, row = build_fp8_pair(weights)
        res = {}
        for agree in (True, False):
            s = Fp8Settings(format=fmt, agree_amax_across_tp=agree)
            res[agree] = run_pair(col, row, x, grad_y, s)
        res["hp"] = run_pair(col, row, x, grad_y, None)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_distributed()
