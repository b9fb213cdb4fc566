"""Helpers shared by tests/ and tools/ (not used by training).

* :func:`rel`: relative error ``|a - b| / |b|`` (Frobenius norms, in fp32).
* :func:`parallel_linear_config`: a ``ModelParallelConfig`` for bare parallel linears.
* :func:`build_fp8_pair`: the ``torchao`` backend's column -> GELU -> row linear pair holding this
  rank's TP shards of given full weights.
"""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def parallel_linear_config(params_dtype=torch.float32):
    """A ``ModelParallelConfig`` for bare parallel linears on any host: full master weights on
    CPU split over TP, no fused wgrad (apex CUDA), no sequence parallelism."""
    import torch.distributed as dist
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=dist.get_world_size() if dist.is_initialized() else 1,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        params_dtype=params_dtype,
    )


def build_fp8_pair(weights: dict, params_dtype=torch.float32, device=None):
    """Float8ColumnParallelLinear -> Float8RowParallelLinear with this rank's shards of
    ``weights`` (``w1 [ffn, hidden]``, ``b1``, ``w2 [hidden, ffn]``, ``b2``)."""
    from megatron.core import parallel_state

    from megatron_sd3.backends.torchao import Float8ColumnParallelLinear, Float8RowParallelLinear

    cfg = parallel_linear_config(params_dtype)
    # an explicit tp_group: with None megatron warns on every forward (a torch.compile graph break)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ffn, hidden = weights["w1"].shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    noop = lambda w: None  # noqa: E731 - weights are copied in below
    col = Float8ColumnParallelLinear(
        hidden, ffn, config=cfg, init_method=noop, bias=True, gather_output=False, tp_group=tp_group
    )
    row = Float8RowParallelLinear(
        ffn, hidden, config=cfg, init_method=noop, bias=True, input_is_parallel=True,
        skip_bias_add=False, tp_group=tp_group,
    )
    with torch.no_grad():
        col.weight.copy_(weights["w1"].chunk(tp, 0)[rank])
        col.bias.copy_(weights["b1"].chunk(tp, 0)[rank])
        row.weight.copy_(weights["w2"].chunk(tp, 1)[rank])
        row.bias.copy_(weights["b2"])
    if device is not None:
        col, row = col.to(device), row.to(device)
    return col, row
