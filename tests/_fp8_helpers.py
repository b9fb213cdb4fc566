"""Helpers for tests/test_fp8.py: megatron parallel_state on CPU/gloo, the FP8 linear pair, and the
TP=2 worker started by torch.multiprocessing.spawn (kept in a module so spawn can import it).

CPU work-arounds used here (no megatron-core patching needed for bare linears):
* ``use_cpu_initialization=True``: megatron builds the full master weight on CPU and splits it
  over TP (the GPU path allocates on ``torch.cuda.current_device()``);
* ``gradient_accumulation_fusion=False`` (the fused wgrad kernel is an apex CUDA extension);
* ``model_parallel_cuda_manual_seed`` is never called (it seeds CUDA RNG; not needed here);
* sequence parallel stays off (megatron's sequence-parallel gather allocates on CUDA).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

HIDDEN = 64
FFN = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int, world_size: int, port: int, tp: int) -> bool:
    """gloo process group + megatron parallel_state; returns True if it created them."""
    from megatron.core import parallel_state

    created = False
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        created = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        created = True
    return created


def teardown_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def mp_config(params_dtype=torch.float32):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=dist.get_world_size() if dist.is_initialized() else 1,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        params_dtype=params_dtype,
    )


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


def build_pair(weights, params_dtype=torch.float32):
    """Float8ColumnParallelLinear -> GELU -> Float8RowParallelLinear with this rank's shards."""
    from megatron.core import parallel_state

    from megatron_sd3.fp8 import Float8ColumnParallelLinear, Float8RowParallelLinear

    cfg = mp_config(params_dtype)
    ffn, hidden = weights["w1"].shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    noop = lambda w: None  # noqa: E731 - weights are copied in below
    col = Float8ColumnParallelLinear(
        hidden, ffn, config=cfg, init_method=noop, bias=True, gather_output=False
    )
    row = Float8RowParallelLinear(
        ffn, hidden, config=cfg, init_method=noop, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():
        col.weight.copy_(weights["w1"].chunk(tp, 0)[rank])
        col.bias.copy_(weights["b1"].chunk(tp, 0)[rank])
        row.weight.copy_(weights["w2"].chunk(tp, 1)[rank])
        row.bias.copy_(weights["b2"])
    return col, row


def pair_forward(col, row, x):
    h, _ = col(x)
    h = torch.nn.functional.gelu(h, approximate="tanh")
    y, _ = row(h)
    return y


def run_pair(col, row, x, grad_y, settings=None):
    """Forward + backward (optionally under fp8_context); returns output and local grads."""
    from megatron_sd3.fp8 import fp8_context

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
    from megatron_sd3.fp8 import Fp8Settings

    init_parallel(rank, world_size, port, tp=world_size)
    try:
        weights = full_weights()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 2, HIDDEN, generator=g)
        grad_y = torch.randn(32, 2, HIDDEN, generator=g)
        col, row = build_pair(weights)
        res = {}
        for agree in (True, False):
            s = Fp8Settings(format=fmt, agree_amax_across_tp=agree)
            res[agree] = run_pair(col, row, x, grad_y, s)
        res["hp"] = run_pair(col, row, x, grad_y, None)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown_parallel()
