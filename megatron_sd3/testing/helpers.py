"""Helpers shared by tests/ and tools/ (not used by training).

* :func:`rel`: relative error ``|a - b| / |b|`` (Frobenius norms, in fp32).
* :func:`parallel_linear_config`: a ``ModelParallelConfig`` for bare parallel linears.
* :func:`build_fp8_pair`: the ``torchao`` backend's column -> GELU -> row linear pair holding this
  rank's TP shards of given full weights.
* :func:`tiny_forward_inputs` / :func:`block_inputs` / :func:`block_graphs`: how many graphs (and graph breaks)
  torch.compile makes of one joint block of a model, FP8 on or off.
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


def tiny_forward_inputs(cfg, micro_batch: int = 1, latent: int = 8) -> dict:
    """Fixed random inputs of ``SD3Model.forward`` for config ``cfg``."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(micro_batch, cfg.in_channels, latent, latent, generator=g),
                encoder_hidden_states=torch.randn(micro_batch, cfg.text_seq_len, cfg.joint_attention_dim,
                                                  generator=g),
                pooled_projections=torch.randn(micro_batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.full((micro_batch,), 500.0))


def block_inputs(model, inputs: dict, index: int = 1) -> tuple:
    """The ``(args, kwargs)`` joint block ``index`` of ``model`` gets in ``model(**inputs)``."""
    seen = {}
    handle = model.blocks[index].register_forward_pre_hook(
        lambda mod, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def block_graphs(model, inputs: dict, index: int = 1):
    """torch.compile's view of joint block ``index`` of ``model``: ``torch._dynamo.explain`` of
    the block on :func:`block_inputs`, inside the block's own FP8 context (as the model runs it).
    Returns the explain output (``graph_count``, ``graph_break_count``, ``break_reasons``).
    Traces only (nothing is compiled)."""
    import torch._dynamo as dynamo

    block = model.blocks[index]
    args, kwargs = block_inputs(model, inputs, index)
    dynamo.reset()
    with model.backend.layer_fp8_context(model.config, block.layer_number - 1):
        return dynamo.explain(block)(*args, **kwargs)
