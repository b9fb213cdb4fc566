"""Activation memory: measured (autograd's saved-tensor hooks) and planned (closed form).

Measured: :func:`saved_bytes_by_part` runs a forward pass under
``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of every distinct storage
that autograd keeps for the backward pass, parameters excluded, after the forward has returned
(so the outputs selective recomputation drops count as freed). Each storage is attributed to
the part of the model (``embeddings``, block ``layer_number``, ``head``) whose forward started
last before it was saved.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Optional

import torch


@contextlib.contextmanager
def _labelled(model):
    """Forward pre-hooks that name the part of ``model`` running now."""
    state = {"part": "other"}
    handles = []

    def setter(name):
        def hook(module, args):
            state["part"] = name
        return hook

    for name in ("embeddings", "head"):
        if hasattr(model, name):
            handles.append(getattr(model, name).register_forward_pre_hook(setter(name)))
    for block in getattr(model, "blocks", []):
        handles.append(block.register_forward_pre_hook(setter(block.layer_number)))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def saved_bytes_by_part(model: torch.nn.Module, run: Callable[[], object]) -> dict:
    """Bytes saved for backward by ``run()`` (a forward of ``model``), per part of the model.

    Returns ``{part: bytes}``; parts are ``"embeddings"``, the blocks' layer numbers, ``"head"``
    and ``"other"`` (the loss, anything outside those modules). The output of ``run()`` is kept
    alive until the count is done, as the backward pass would."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = []
    with _labelled(model) as state:
        def pack(t):
            saved.append((state["part"], t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    seen, per_part = set(), defaultdict(int)
    for part, t in saved:
        s = t.untyped_storage()
        if s._cdata in params or s._cdata in seen:
            continue
        seen.add(s._cdata)
        per_part[part] += s.nbytes()
    del out
    return dict(per_part)


# ---------------------------------------------------------------------------------------------
# Planned: closed forms from the configuration (no model is built)
# ---------------------------------------------------------------------------------------------
GiB = 2**30


def _ffn(cfg) -> int:
    return cfg.ffn_hidden_size or 4 * cfg.hidden_size


def block_params(cfg, layer_number: int, tp: int = 1) -> int:
    """Parameters of one joint block on one TP rank (linears split over TP, adaLN replicated)."""
    h, f, d = cfg.hidden_size, _ffn(cfg), cfg.kv_channels
    dual = (layer_number - 1) in cfg.dual_attention_layers
    keeps_text = cfg.block_keeps_text(layer_number)
    n = h * (9 if dual else 6) * h + (9 if dual else 6) * h  # adaLN
    n += (6 if keeps_text else 2) * h * (h + 1)  # context adaLN
    qkv, proj, mlp = 3 * h * h // tp + 3 * h // tp, h * h // tp + h, h * f // tp + f // tp + f * h // tp + h
    norms = 2 * d if cfg.qk_norm else 0
    n += 2 * (qkv + norms) + proj + (proj if keeps_text else 0)  # joint attention, both streams
    if dual:
        n += qkv + norms + proj
    n += mlp + (mlp if keeps_text else 0)
    return n


def embedding_params(cfg) -> int:
    h, p = cfg.hidden_size, cfg.patch_size
    return (cfg.in_channels * p * p * h + h) + (256 * h + h + h * h + h) + \
        (cfg.pooled_projection_dim * h + h + h * h + h) + (cfg.joint_attention_dim * h + h)


def head_params(cfg) -> int:
    h, p = cfg.hidden_size, cfg.patch_size
    return h * 2 * h + 2 * h + h * p * p * cfg.in_channels + p * p * cfg.in_channels


def block_activation_bytes(cfg, layer_number: int, n_img: int, micro_batch: int, tp: int = 1,
                           mode: Optional[str] = None, text_output: Optional[bool] = None,
                           cp: Optional[int] = None) -> float:
    """Bytes one joint block saves for backward per microbatch.

    ``mode``: ``none``, ``selective`` or ``full`` (a block that is checkpointed; default from the
    config, where ``full`` means this block's unit is recomputed). Counts in units of
    ``tokens x micro_batch x hidden`` elements, per stream, of what autograd keeps (see
    docs/design.md, section "Memory"; checked against :func:`saved_bytes_by_part` by the tests):

    ====================  ===============================  ================================
    part                  none                             selective
    ====================  ===============================  ================================
    attention, per stream input, norm, qkv in, qkv (3),    input, qkv (3), [proj in, out]
                          qk-norms (2), [proj in, out]
    joint kernel [x | c]  q, k, v, output (4)              output (1)
    dual attention (img)  input, qkv (3), qk-norms (2),    qkv (3), output, proj out
                          q, k, v, output (4)
    MLP, per stream       input, norm, fc1 in, fc1 out     input, fc1 out (f/h), fc2 out
                          (f/h), GELU (f/h), fc2 out
    ====================  ===============================  ================================

    plus the per-token statistics (norms, softmax) and the ``[B, h]`` adaLN chunks. TP splits the
    head-sized tensors (qkv, attention, MLP hidden) over its ranks; inputs, norms and GEMM
    outputs of the row-parallel layers stay whole (no sequence parallelism).

    Context parallelism (``cp``, default the config's): a rank's image stream is ``n_img / cp``
    tokens, its text stream whole; the attention kernels' tensors (and softmax statistics) cover
    the whole sequence for ``1 / cp`` of the heads, and the kernel's output comes back through
    the all-to-all as a new tensor (the output projections' input).
    """
    if mode is None:
        mode = {"selective": "selective", "full": "full"}.get(cfg.recompute_granularity, "none")
    if cp is None:
        from megatron_sd3.models.context_parallel import size as cp_size

        cp = cp_size(cfg)
    e = torch.finfo(cfg.params_dtype).bits // 8
    h, f, b = cfg.hidden_size, _ffn(cfg), micro_batch
    n_txt = cfg.padded_text_len
    heads = cfg.num_attention_heads // tp
    n_all = n_img + n_txt  # the joint attention's sequence
    n_img = n_img / cp  # this rank's image tokens
    if mode == "full":  # the unit's inputs x, c (and y, shared)
        return float(e * b * h * (n_img + n_txt))
    dual = (layer_number - 1) in cfg.dual_attention_layers
    keeps_text = cfg.block_keeps_text(layer_number)
    if text_output is None:
        text_output = keeps_text and (layer_number < cfg.num_layers or cfg.text_recon)
    q = 2 if cfg.qk_norm else 0
    modules = set(cfg.recompute_modules or ()) if mode == "selective" else set()
    L, Q, A = "layernorm" in modules, "qk_norm" in modules, "mlp_act" in modules
    split = 1.0 / tp  # head-sized tensors
    fh = f / h
    # the joint attention's output projection input: the kernel's output laid out as [s, b, h],
    # a copy when b > 1, a view of the (kept) kernel output when b = 1
    proj_in = split if b > 1 or cp > 1 else 0.0

    def attn_stream(projected: bool) -> float:
        # input, [norm, modulated qkv input], qkv (3), [qk-norms], [proj in, proj out]
        return 1 + (0 if L else 2) + (3 + (0 if Q else q)) * split + ((proj_in + 1) if projected else 0)

    def mlp_stream() -> float:
        # input, [norm, fc1 input], fc1 out, [GELU], fc2 out
        return 2 + (0 if L else 2) + (1 if A else 2) * fh * split

    units_img = attn_stream(True) + mlp_stream()
    units_txt = attn_stream(text_output) + (mlp_stream() if text_output else 0)
    units_joint = (1 if Q else 4) * split  # the kernel's output [, q, k, v of [x | c]]
    if dual:  # [modulated input], qkv (3), output, proj out; [qk-norms, kernel copies]
        dual_q = Q and cfg.qk_norm
        units_img += (0 if L else 1) + ((4 * split + 1) if dual_q else (3 + q + 4) * split) + (proj_in if cp > 1 else 0)
    # per-token statistics: LN mean/rstd, RMS-norm rstd and softmax lse
    stats_img = (0 if L else 4) + (0 if Q else q * heads) + (0 if Q and cfg.qk_norm else q * heads) * dual + heads * (2 if dual else 1)
    stats_txt = (0 if L else (4 if text_output else 2)) + (0 if Q else q * heads)
    ada = b * h * (2 + (9 if dual else 6) + (6 if keeps_text else 2))
    elems = b * h * (units_img * n_img + units_txt * n_txt + units_joint * n_all / cp)
    elems += b * (stats_img * n_img + stats_txt * n_txt + heads * n_txt / cp) + ada
    return float(e * elems)


def embedding_activation_bytes(cfg, n_img: int, micro_batch: int) -> float:
    """First stage: the text tokens the context embedder keeps, the latents the patch embedding
    keeps, the timestep and pooled embedders' inputs and hidden activations."""
    e = torch.finfo(cfg.params_dtype).bits // 8
    p, h = cfg.patch_size, cfg.hidden_size
    return float(e * micro_batch * (cfg.text_seq_len * cfg.joint_attention_dim + n_img * cfg.in_channels * p * p
                                    + 256 + cfg.pooled_projection_dim + 4 * h))


def head_activation_bytes(cfg, n_img: int, micro_batch: int) -> float:
    """Last stage: the final norm's input, output and statistics, the projection's input, the
    adaLN input (of this rank's ``n_img / CP`` image tokens)."""
    e = torch.finfo(cfg.params_dtype).bits // 8
    h = cfg.hidden_size
    from megatron_sd3.models.context_parallel import size as cp_size

    n_img = n_img / cp_size(cfg)
    return float(e * micro_batch * (3 * n_img * h + 2 * n_img + 2 * h))


def in_flight_microbatches(pp: int, rank: int, num_microbatches: int, vpp: Optional[int] = None) -> int:
    """Model-chunk microbatches whose activations pipeline rank ``rank`` holds at its peak under
    megatron's 1F1B (``pp - rank``) or interleaved 1F1B (its warmup + 1)."""
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - rank, num_microbatches)
    return min((pp - rank - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)


def plan_memory(cfg, *, latent_hw, micro_batch: int, data_parallel: int = 1,
                num_microbatches: Optional[int] = None, use_distributed_optimizer: bool = False,
                stage_blocks: Optional[list[int]] = None) -> list[dict]:
    """Megatron-LM's theoretical memory report, per pipeline rank, in bytes.

    Weights and gradients: ``bf16`` keeps bf16 weights, fp32 gradients (``grad_reduce_in_fp32``)
    and fp32 main weights + Adam moments in the optimizer (12 bytes a parameter, divided over DP
    with the distributed optimizer); fp32 runs keep 4 + 4 + 8. Activations: per microbatch (the
    blocks of this rank with the config's recompute setting, embeddings on the first and head on
    the last stage) times the microbatches in flight, plus, under full recompute, one unit's
    activations rebuilt during its backward."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size
    m = num_microbatches or pp
    if stage_blocks is None:
        from megatron_sd3.training.parallel_layout import stage_layers

        stage_blocks = stage_layers(cfg.num_layers, pp, None)
    n_img = cfg.num_image_tokens(*latent_hw)
    b = micro_batch
    chunks_per_rank = vpp or 1
    # global block numbers of each (rank, chunk): megatron's interleaved order
    per_chunk = [n // chunks_per_rank for n in stage_blocks]
    starts, cur = {}, 0
    for c in range(chunks_per_rank):
        for r in range(pp):
            starts[(r, c)] = cur
            cur += per_chunk[r]
    bf16 = cfg.bf16
    out = []
    for r in range(pp):
        params = 0
        act_chunks = []
        for c in range(chunks_per_rank):
            layers = list(range(starts[(r, c)] + 1, starts[(r, c)] + per_chunk[r] + 1))
            params += sum(block_params(cfg, n, tp) for n in layers)
            act = _chunk_activations(cfg, layers, n_img, b, tp)
            first, last = (r == 0 and c == 0), (r == pp - 1 and c == chunks_per_rank - 1)
            if first:
                params += embedding_params(cfg)
                act += embedding_activation_bytes(cfg, n_img, b)
            if last:
                params += head_params(cfg)
                act += head_activation_bytes(cfg, n_img, b)
            act_chunks.append((act, layers))
        weights = params * (2 if bf16 else 4)
        grads = params * 4
        opt_per_param = 12 if bf16 else 8
        optim = params * opt_per_param / (data_parallel if use_distributed_optimizer else 1)
        flight = in_flight_microbatches(pp, r, m, vpp)
        per_mb = sum(a for a, _ in act_chunks) / chunks_per_rank
        activations = per_mb * flight  # chunk-microbatches in flight x an average chunk's
        working = 0.0
        if cfg.recompute_granularity == "full":
            k = cfg.recompute_num_layers if cfg.recompute_method == "uniform" else 1
            layers = act_chunks[0][1]
            working = sum(block_activation_bytes(cfg, n, n_img, b, tp, mode="none") for n in layers[:k])
        out.append(dict(rank=r, params=params, weights=weights, grads=grads, optimizer=optim,
                        activations_per_microbatch=per_mb * chunks_per_rank, in_flight=flight,
                        activations=activations + working, recompute_working_set=working,
                        total=weights + grads + optim + activations + working))
    return out


def _chunk_activations(cfg, layers, n_img, b, tp) -> float:
    """One microbatch of one model chunk's blocks, with the config's recompute setting."""
    if cfg.recompute_granularity != "full":
        return sum(block_activation_bytes(cfg, n, n_img, b, tp) for n in layers)
    k = cfg.recompute_num_layers
    total = 0.0
    for i, n in enumerate(layers):
        if cfg.recompute_method == "uniform":
            # one unit of k blocks keeps only its first block's inputs
            total += block_activation_bytes(cfg, n, n_img, b, tp, mode="full") if i % k == 0 else 0.0
        else:  # block: the first k blocks of each chunk are recomputed
            total += block_activation_bytes(cfg, n, n_img, b, tp, mode="full" if i < k else "none")
    return total


def format_report(rows: list[dict], title: str = "theoretical memory", gpu_memory_gib: Optional[float] = None) -> str:
    lines = [f"------------------------ {title} (per rank, GiB) ------------------------",
             " pp rank | params (M) | weights |  grads | optimizer | act/microbatch x in flight | activations |  total"]
    for r in rows:
        lines.append(f" {r['rank']:7d} | {r['params'] / 1e6:10.1f} | {r['weights'] / GiB:7.2f} | {r['grads'] / GiB:6.2f} |"
                     f" {r['optimizer'] / GiB:9.2f} | {r['activations_per_microbatch'] / GiB:14.3f} x {r['in_flight']:9d} |"
                     f" {r['activations'] / GiB:11.2f} | {r['total'] / GiB:6.2f}")
    if gpu_memory_gib is not None:
        worst = max(r["total"] for r in rows) / GiB
        lines.append(f" largest rank: {worst:.2f} GiB of {gpu_memory_gib:g} GiB "
                     f"({'fits' if worst <= gpu_memory_gib else 'does NOT fit'})")
    return "\n".join(lines)


def largest_micro_batch(cfg, gpu_memory_gib: float, limit: int = 1024, **kw) -> int:
    """The largest micro batch whose worst rank fits in ``gpu_memory_gib`` (0: none fits)."""
    best = 0
    for b in range(1, limit + 1):
        if max(r["total"] for r in plan_memory(cfg, micro_batch=b, **kw)) / GiB > gpu_memory_gib:
            break
        best = b
    return best


def report_at_start(cfg, args, data_parallel: int, print_fn=print) -> None:
    """The report ``pretrain`` prints at start (rank 0), from the run's config and flags, for
    the mock latent size or else the model's ``sample_size`` latents."""
    from megatron_sd3.arguments import mock_latent_hw

    latent_hw = mock_latent_hw(args, cfg.sample_size)
    m = args.global_batch_size // (args.micro_batch_size * data_parallel)
    rows = plan_memory(cfg, latent_hw=latent_hw, micro_batch=args.micro_batch_size,
                       data_parallel=data_parallel, num_microbatches=m,
                       use_distributed_optimizer=args.use_distributed_optimizer,
                       stage_blocks=getattr(args, "pipeline_layers", None))
    rec = cfg.recompute_granularity or "none"
    if rec == "full":
        rec += f" ({cfg.recompute_method}, {cfg.recompute_num_layers} layers)"
    elif rec == "selective":
        rec += f" ({', '.join(cfg.recompute_modules)})"
    print_fn(format_report(rows, title=f"theoretical memory, recompute {rec}, latents {latent_hw[0]}x{latent_hw[1]}, "
                                       f"{m} microbatches"))
    if cfg.pipeline_model_parallel_size > 1:
        print_fn(pipeline_message_line(cfg, latent_hw, args.micro_batch_size))


def pipeline_message_line(cfg, latent_hw, micro_batch: int) -> str:
    """What one rank sends a later pipeline stage per microbatch (``models/packing.py``): its
    image tokens (its context-parallel chunk, its sequence-parallel slice of it), the text (and
    the reconstruction target), ``y``; in tokens and bytes."""
    from megatron_sd3.models.packing import ActivationLayout

    layout = ActivationLayout.of(cfg, latent_hw)
    dtype = cfg.pipeline_dtype or cfg.params_dtype
    n_txt = layout.n_txt // layout.sp
    parts = f"{layout.n_img_local} image + {n_txt} text" + (f" + {n_txt} target" if layout.carry_target else "") + " + 1 (y)"
    return (f" pipeline message per rank and microbatch: {layout.local_len} tokens ({parts}) x {micro_batch} x "
            f"{cfg.hidden_size} = {layout.bytes_per_message(micro_batch, cfg.hidden_size, dtype) / 2**20:.2f} MiB")


# ---------------------------------------------------------------------------------------------
# Measured next to planned (tests, tools/bench_memory.py)
# ---------------------------------------------------------------------------------------------
def sample_inputs(cfg, latent_hw, micro_batch: int, seed: int = 0) -> dict:
    """A random first-stage batch of the model's shapes (CPU), drawn in fp32, in the parameter
    dtype (``cfg.params_dtype``) with the timesteps in fp32, as ``TrainStep`` hands them."""
    g = torch.Generator().manual_seed(seed)
    b, dt = micro_batch, cfg.params_dtype
    return dict(hidden_states=torch.randn(b, cfg.in_channels, *latent_hw, generator=g).to(dt),
                encoder_hidden_states=torch.randn(b, cfg.text_seq_len, cfg.joint_attention_dim, generator=g).to(dt),
                pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g).to(dt),
                timestep=torch.rand(b, generator=g) * 1000)


def measure_saved_bytes(model, latent_hw, micro_batch: int) -> dict:
    """Saved-for-backward bytes of one forward of a whole (single-stage) ``SD3Model``, by part."""
    inputs = sample_inputs(model.config, latent_hw, micro_batch)
    return saved_bytes_by_part(model, lambda: model(**inputs))


def planned_saved_bytes(cfg, latent_hw, micro_batch: int, tp: int = 1) -> dict:
    """The planner's figure for each part :func:`measure_saved_bytes` reports (one stage)."""
    n_img = cfg.num_image_tokens(*latent_hw)
    out = {"embeddings": embedding_activation_bytes(cfg, n_img, micro_batch),
           "head": head_activation_bytes(cfg, n_img, micro_batch)}
    k, last = cfg.recompute_num_layers, cfg.num_layers
    for i, n in enumerate(range(1, cfg.num_layers + 1)):
        mode = None
        if cfg.recompute_granularity == "full":
            if cfg.recompute_method == "uniform":
                # a unit's inputs are saved once its blocks have run: counted on its last block
                mode = "full" if (i + 1) % k == 0 or n == last else "skip"
            else:
                mode = "full" if i < k else "none"
        out[n] = 0.0 if mode == "skip" else block_activation_bytes(cfg, n, n_img, micro_batch, tp, mode=mode)
    return out
