#!/usr/bin/env python
"""Training throughput of the SD3 MMDiT: bf16 vs FP8 (local/torchao, TE if installed), text
reconstruction off vs on. Single process, TP = PP = 1 (``initialize_distributed(1, 1)``).

    python tools/bench_throughput.py                       # CPU: tiny preset, 64 px (make bench)
    python tools/bench_throughput.py --preset sd3_light --resolution 256 1024   # GPU default
    python tools/bench_throughput.py --json out.json --compile both

What one iteration is
    The real training step: ``TrainStep`` (megatron-core's ``get_forward_backward_func``
    schedule, one microbatch of ``--micro-batch-size`` samples), megatron ``DistributedDataParallel``
    (grads in fp32), and megatron's optimizer, all from ``build_training`` -- ``OptimizerConfig(
    optimizer="adam", weight_decay=0.01)``, i.e. AdamW; without apex/TE megatron uses
    ``torch.optim.AdamW``; with bf16 params it is ``Float16OptimizerWithFloat16Params`` (fp32 master
    weights), with grad clipping 1.0. Flow-matching noise, timesteps and text dropout are drawn per
    sample inside the step, as in training. Inputs are synthetic (random latents ``[C, res/8,
    res/8]``, text ``[text_seq_len, joint_attention_dim]``, pooled), made once on the device.

Precision variants
    ``bf16``      bf16 params (megatron ``Float16Module`` as Megatron-LM's ``--bf16``); on CPU
                  this row is fp32 (named ``fp32``), CPU bf16 GEMMs being no reference.
    ``fp8-local`` FP8 GEMMs in the joint blocks through torchao (``--fp8-format hybrid``,
                  tensorwise), every block GEMM (``--fp8-gemms all``), bf16 params on GPU; text
                  padded to a multiple of 16.
    ``fp8-rule``  as ``fp8-local`` with ``--fp8-gemms rule`` (pretrain's default): FP8 only for
                  the GEMMs where the step-time model says FP8 plus its casts beat bf16.
    ``fp8-rowwise`` as ``fp8-local`` with torchao's rowwise recipe (``--fp8-format e4m3
                  --fp8-recipe rowwise``: per-row scales, all operands e4m3).
    ``fp8-per-gemm`` as ``fp8-local``, but compiled with a graph break before every FP8 GEMM
                  (each GEMM with its casts a compiled region of its own), against
                  ``fp8-local``'s one graph per joint block; the same as ``fp8-local`` eager.
    ``fp8-te``    ``--transformer-impl transformer_engine`` under megatron's FP8 context (delayed
                  recipe, the training default with TE); only when Transformer Engine imports.
    each with ``text_recon_gamma`` 0 (off) and 0.5 (on, target layer 0).

Measurements
    ms/iter from CUDA events around ``--iters`` timed iterations after ``--warmup`` (CPU:
    ``time.perf_counter``); samples/s = micro batch / s; TFLOP/s per device from
    ``megatron_sd3.flops.model_flops_per_sample(cfg, latent_hw)``, the count of the training
    log (GEMM FLOPs of blocks, embedders and head, fwd + bwd = 3 x forward, joint attention
    included, with the *unpadded* text length: the FP8 rows get no credit for pad tokens; see
    flops.py for the formula); MFU against the
    dense bf16 peak of the card (``flops.peak_tflops``; FP8 rows also against the FP8 peak);
    none on CPU. Peak memory: ``torch.cuda.max_memory_allocated`` per variant on GPU; on CPU the
    process RSS after the variant and the process-lifetime peak RSS (not per variant).

Planned against measured: each row also carries what the planners say for its config --
``planned_ms`` (``megatron_sd3.step_time.plan``: the step-time model of ``tools/fp8_plan.py``, on
the card's constants, H100's off an H200; its ``planned_fp8_gemms`` are the GEMMs the rule puts
in FP8) and ``planned_mem_GiB`` (``megatron_sd3.memory.plan_memory``: weights, gradients,
optimizer and activations, the training log's theoretical memory), beside ``ms_per_iter`` and
``peak_mem_GiB``.

``--compile on|both`` compiles every joint block in place (``block.compile()``; parameter
names, DDP and the optimizer are untouched); ``both`` measures eager and compiled and marks the
faster per variant (``best``); ``graphs`` compiles with ``mode="reduce-overhead"`` (the blocks
replayed as CUDA graphs, ``--torch-compile-mode reduce-overhead``; GPU only), ``all`` measures
eager, compiled and CUDA graphs. Compile time is in ``warmup_s``, not in ms/iter.

Host-boundness: with ``--profile`` each row also gets ``gpu_idle_ms_per_iter`` (profiled wall
time minus the kernels' device time: what the GPU waits on the host, an upper bound where
kernels overlap), its two causes ``kernels_per_iter`` (kernel launches per iteration; CPU:
operators run) and, on GPU, ``host_syncs_per_iter`` (calls CUDA's sync debug mode flags
during one iteration).

Each (text recon, precision) pair is built once and measured at every resolution (order: recon
off before on, bf16 before FP8, so a time budget cuts the least important rows). On GPU the
parallel linears are initialised on the device (``--init device``: megatron's GPU init, seconds
instead of ~10-30 s of CPU master-weight init for sd3_light's 1.5 B parameters; falls back to
``cpu`` if it fails); the numbers do not depend on the weights. On CPU one thread is used unless
``OMP_NUM_THREADS`` is set (OpenMP spin-waiting on a shared 2-core machine made ms/iter swing by
50x).

Prints a table and writes JSON (``--json``; rewritten after every row, so a run cut by a timeout
keeps what it measured; ``complete`` and ``summary`` appear at the end); ``--rows-jsonl`` appends
each row as one line, with the device and ``--tag``, as soon as it is measured (the one log of
``tools/gpu_check.sh``). A variant that fails is
recorded with its error and the others still run. ``--time-budget`` skips the remaining variants
once exceeded.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings

os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.filterwarnings("ignore")
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's Enum registration

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

T0 = time.time()


def log(*a):
    print(f"[bench {time.time() - T0:7.1f}s]", *a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet():
    """Hide the import-time chatter of megatron-core/torchao (apex/TE fallbacks, .so loads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(old)


def rss_mb() -> tuple[float, float]:
    """(current RSS, process-lifetime peak RSS) in MiB (Linux)."""
    cur = float("nan")
    try:
        with open("/proc/self/statm") as fh:
            cur = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


VARIANTS = ("bf16", "fp8-local", "fp8-rule", "fp8-rowwise", "fp8-per-gemm", "fp8-te")


def variants(cuda: bool, want: list[str]):
    """(name, (fp8 format, fp8 recipe, fp8 gemms) or None, transformer_impl, bf16 params)."""
    from megatron_sd3.backends.transformer_engine import transformer_engine_available as have_transformer_engine

    out = []
    for v in want:
        if v == "bf16":
            out.append(("bf16" if cuda else "fp32", None, "local", cuda))
        elif v == "fp8-local":
            out.append(("fp8-local", ("hybrid", "tensorwise", "all"), "local", cuda))
        elif v == "fp8-rule":
            out.append(("fp8-rule", ("hybrid", "tensorwise", "rule"), "local", cuda))
        elif v == "fp8-rowwise":
            out.append(("fp8-rowwise", ("e4m3", "rowwise", "all"), "local", cuda))
        elif v == "fp8-per-gemm":
            out.append(("fp8-per-gemm", ("hybrid", "tensorwise", "all"), "local", cuda))
        elif v == "fp8-te":
            if have_transformer_engine():
                out.append(("fp8-te", ("hybrid", "delayed", "all"), "transformer_engine", cuda))
            else:
                log("fp8-te skipped: Transformer Engine not importable")
        else:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return out


def flops_per_sample(cfg, latent: int) -> int:
    """One sample's training-step FLOPs at a square latent: the training log's count."""
    from megatron_sd3.flops import model_flops_per_sample

    return model_flops_per_sample(cfg, (latent, latent), training=True)


def build(preset, fp8, impl, bf16, gamma, num_layers, init="cpu", attention_backend="auto",
          hidden_size=None):
    """The config of one variant and its model, DDP and optimizer (``build_training``)."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training

    parallel = {"attention_backend": AttnBackend[attention_backend]}
    if bf16:
        parallel.update(bf16=True, params_dtype=torch.bfloat16)
    if fp8:
        parallel["fp8"], parallel["fp8_recipe"], parallel["fp8_gemms"] = fp8
    overrides = dict(text_recon_gamma=gamma, text_recon_target_layer=0)
    if num_layers:
        overrides["num_layers"] = num_layers  # the preset's first N blocks
    if hidden_size:  # SD3's head width 64, MLP 4x (megatron's default ffn_hidden_size)
        overrides.update(hidden_size=hidden_size, num_attention_heads=hidden_size // 64)
    cfg = make_config(preset, parallel=parallel, **overrides)
    if init == "device":
        # megatron initialises the parallel linears on the GPU (Megatron-LM's default): seconds
        # instead of the CPU master-weight path's ~10-30 s for sd3_light's 1.5 B parameters.
        # The weights then differ from the layout-independent CPU init; throughput does not.
        cfg.use_cpu_initialization = False
    return build_training(cfg, transformer_impl=impl,
                          optimizer=dict(lr=1e-4, weight_decay=0.01, clip_grad=1.0))


def planned(cfg, latent: int, mbs: int, fp8_gemms, device_name) -> dict:
    """What the planners say of one row: the step-time model (``step_time.plan``, the card's
    constants; H100's for any other device) and the theoretical memory (``plan_memory``)."""
    from megatron_sd3 import step_time
    from megatron_sd3.backends.fp8_settings import model_gpu
    from megatron_sd3.memory import GiB, plan_memory

    gpu, hw = model_gpu(device_name), (latent, latent)
    p = step_time.plan(cfg, hw, mbs, gpu=gpu, fp8=fp8_gemms or "all")
    (mem,) = plan_memory(cfg, latent_hw=hw, micro_batch=mbs)  # TP = PP = DP = 1: one rank
    return dict(plan_gpu=gpu, planned_ms=p["fp8_ms"] if fp8_gemms else p["bf16_ms"],
                planned_fp8_gemms=sorted({g["name"] for g in p["gemms"] if g["fp8"]}) if fp8_gemms else [],
                planned_mem_GiB=round(mem["total"] / GiB, 2))


def synthetic_batch(cfg, mbs, latent, dev):
    g = torch.Generator().manual_seed(0)
    mb = {
        "latents": torch.randn(mbs, cfg.in_channels, latent, latent, generator=g),
        "prompt_embeds": torch.randn(mbs, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(mbs, cfg.pooled_projection_dim, generator=g),
    }
    return {k: v.to(dev) for k, v in mb.items()}


# Kernel-name rules, first match wins (cuBLAS/cuBLASLt/CUTLASS GEMMs incl. FP8 _scaled_mm,
# flash/cuDNN/mem-efficient attention, inductor's fused Triton kernels, the rest).
KERNEL_CLASSES = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "cublas", "matmul", "sm90_",
              "aten::mm", "aten::addmm", "aten::bmm")),
    ("triton (compiled fusions)", ("triton",)),
    ("communication", ("nccl",)),
    ("memcpy/memset", ("memcpy", "memset")),
]


def classify_kernel(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other (eager elementwise, norms, optimizer)"


def kernel_breakdown(step_fn, cuda: bool, iters: int = 2) -> dict:
    """Device time per kernel class over ``iters`` profiled iterations (torch.profiler), per
    iteration, plus the 12 most expensive kernels: where an iteration's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(iters):
            step_fn(i)
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / iters
    per_kernel, launches = {}, 0
    for ev in prof.key_averages():
        # GPU: a kernel's own device time (ops that launched it have self time 0, so nothing
        # counts twice); CPU (testing the code path only): each op's self time
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us > 0:
            per_kernel[ev.key] = per_kernel.get(ev.key, 0.0) + us / 1e3 / iters
            launches += ev.count
    classes = {}
    for name, ms in per_kernel.items():
        c = classify_kernel(name)
        classes[c] = classes.get(c, 0.0) + ms
    total = sum(classes.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"iters": iters, "wall_ms_per_iter_profiled": round(wall_ms, 2),
            "kernel_ms_per_iter": round(total, 2),
            # the GPU waiting on the host (an upper bound where kernels overlap on streams)
            "gpu_idle_ms_per_iter": round(max(0.0, wall_ms - total), 2) if cuda else None,
            # what keeps the host busy: kernels launched per iteration (CPU: operators run)
            "kernels_per_iter": round(launches / iters, 1),
            "by_class_ms": {k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[n[:120], round(ms, 2)] for n, ms in top]}


def count_syncs(fn) -> int:
    """Synchronising CUDA calls during ``fn()``, as ``torch.cuda.set_sync_debug_mode`` reports them."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def set_compile_regions(variant: str) -> None:
    """``fp8-per-gemm`` compiles each FP8 GEMM as a region of its own, every other variant a
    joint block as one graph (``megatron_sd3.backends.torchao.COMPILE_REGIONS``)."""
    from megatron_sd3.backends import torchao as fp8_torchao

    fp8_torchao.COMPILE_REGIONS = "gemm" if variant == "fp8-per-gemm" else "block"


class Built:
    """One model + DDP + optimizer, measured at several resolutions (and eager, then compiled)."""

    def __init__(self, args, name, fp8, impl, bf16, gamma, dev):
        self.args, self.name, self.fp8, self.gamma, self.dev = args, name, fp8, gamma, dev
        t = time.time()
        self.init = args.init
        # what the process held before this model existed (should be ~0: the previous variant
        # was freed); peak memory of a row is measured from a reset taken with this model alive
        self.mem_before_GiB = (round(torch.cuda.memory_allocated() / 2**30, 2)
                               if dev.type == "cuda" else None)
        with quiet():
            try:
                self.training = build(args.preset, fp8, impl, bf16, gamma, args.num_layers, args.init,
                                      args.attention_backend, args.hidden_size)
            except Exception as e:  # noqa: BLE001 - device init is an optimisation only
                if args.init != "device":
                    raise
                log(f"device init failed ({type(e).__name__}: {str(e)[:200]}); retrying with cpu init")
                gc.collect()
                self.init = "cpu"
                self.training = build(args.preset, fp8, impl, bf16, gamma, args.num_layers, "cpu",
                                      args.attention_backend, args.hidden_size)
        self.build_s = round(time.time() - t, 1)
        self.params_m = round(sum(p.numel() for c in self.chunks for p in c.parameters()) / 1e6, 1)
        self.compiled = False

    # what was built (``megatron_sd3.training.build.Built``), until ``free``
    cfg = property(lambda self: self.training.cfg)
    chunks = property(lambda self: self.training.chunks)
    ddp = property(lambda self: self.training.ddp)
    opt = property(lambda self: self.training.optimizer)

    def compile(self, mode="default"):
        from megatron_sd3.training.build import check_compile_mode, compile_blocks

        check_compile_mode(mode, torch_compile=True)
        if self.compiled:
            torch._dynamo.reset()  # a new mode: no graphs of the previous one reused
        self.training.compiled_blocks = compile_blocks(self.chunks, mode)
        self.compiled = mode

    def measure(self, resolution, mbs) -> dict:
        from megatron_sd3.flops import peak_tflops
        from megatron_sd3.training.step import TrainStep

        args, cfg, dev = self.args, self.cfg, self.dev
        cuda = dev.type == "cuda"
        latent = resolution // 8
        set_compile_regions(self.name)
        row = dict(variant=self.name, text_recon="on" if self.gamma > 0 else "off",
                   resolution=resolution, latent=latent, micro_batch=mbs, compiled=bool(self.compiled),
                   compile_mode=self.compiled or None,
                   preset=args.preset, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                   params_M=self.params_m,
                   build_s=self.build_s, init=self.init, img_tokens=cfg.num_image_tokens(latent, latent),
                   txt_tokens=cfg.padded_text_len, attention_backend=args.attention_backend,
                   fp8_gemms=cfg.fp8_gemms if cfg.fp8 else None)  # what the model was built with
        row.update(planned(cfg, latent, mbs, row["fp8_gemms"], torch.cuda.get_device_name() if cuda else None))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = TrainStep(cfg, self.ddp, self.opt, global_batch_size=mbs, micro_batch_size=mbs, seed=1,
                         cuda_graphs=self.compiled == "reduce-overhead")
        batch = [synthetic_batch(cfg, mbs, latent, dev)]

        def one(i):
            res = step(batch, i * mbs)
            if res.skipped:
                raise RuntimeError(f"step skipped (loss {res.losses})")
            return res

        t = time.time()
        with quiet():
            for i in range(args.warmup):
                res = one(i)
            if cuda:
                torch.cuda.synchronize()
        row["warmup_s"] = round(time.time() - t, 2)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(args.iters):
                res = one(args.warmup + i)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.iters
        else:
            t = time.perf_counter()
            for i in range(args.iters):
                res = one(args.warmup + i)
            ms = (time.perf_counter() - t) * 1e3 / args.iters
        fl = flops_per_sample(cfg, latent)
        tflops = fl * mbs / (ms / 1e3) / 1e12
        row.update(ms_per_iter=round(ms, 2), samples_per_s=round(mbs / (ms / 1e3), 3),
                   model_flop_per_sample=fl, model_tflop_per_sample=round(fl / 1e12, 5), tflops_per_device=round(tflops, 4),
                   loss=round(res.losses["loss"], 5), text_recon_loss=res.losses["text_recon_loss"])
        if cuda:
            dname = torch.cuda.get_device_name()
            pb, pf = peak_tflops(dname, "bf16"), peak_tflops(dname, "fp8")
            row["mfu_bf16_peak"] = round(tflops / pb, 4) if pb else None
            row["mfu_fp8_peak"] = round(tflops / pf, 4) if (pf and self.fp8) else None
            row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["mem_before_build_GiB"] = self.mem_before_GiB
        else:
            row["mfu_bf16_peak"] = row["mfu_fp8_peak"] = None
            cur, peak = rss_mb()
            row["rss_MiB"], row["peak_rss_MiB"] = round(cur, 1), round(peak, 1)
        if args.profile:  # after the timing: a profiler failure costs the breakdown, not the row
            try:
                with quiet():
                    row["kernel_time"] = kernel_breakdown(lambda i: one(args.warmup + args.iters + i), cuda)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                row["kernel_time_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if cuda:
                row["host_syncs_per_iter"] = count_syncs(lambda: one(args.warmup + args.iters + 2))
        del step, batch
        return row

    def free(self):
        """Release model, optimizer and config now (``Built.free``: it breaks the config <->
        optimizer/DDP cycle megatron's hooks make), so the next variant's memory figures hold
        only the next variant."""
        self.training.free()
        del self.training


def fmt_table(rows, cuda):
    mem = "peak GiB" if cuda else "RSS MiB"
    head = ["variant", "recon", "res", "mb", "comp", "ms/iter", "samples/s", "TFLOP/s", "MFU(bf16)",
            "MFU(fp8)", mem, "plan ms", "plan GiB", "note"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["variant"], r["text_recon"], str(r.get("resolution", "-")),
                          str(r.get("micro_batch", "-")), "y" if r.get("compiled") else "n",
                          "-", "-", "-", "-", "-", "-", "-", "-",
                          "ERROR " + r["error"][:60]])
            continue
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append([
            r["variant"], r["text_recon"], str(r["resolution"]), str(r["micro_batch"]),
            {"reduce-overhead": "graphs"}.get(r.get("compile_mode"), "y") if r["compiled"] else "n",
            f"{r['ms_per_iter']:.1f}", f"{r['samples_per_s']:.2f}",
            f"{r['tflops_per_device']:.3g}", pct(r["mfu_bf16_peak"]), pct(r["mfu_fp8_peak"]),
            f"{r['peak_mem_GiB']:.1f}" if cuda else f"{r['rss_MiB']:.0f}",
            f"{r['planned_ms']:.1f}", f"{r['planned_mem_GiB']:.2f}",
            "best" if r.get("best") else "",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def summarize(rows):
    """Per resolution: FP8/bf16 samples/s, recon on/off slowdown (best of eager/compiled)."""
    best = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["variant"], r["text_recon"], r["resolution"])
        if key not in best or r["samples_per_s"] > best[key]["samples_per_s"]:
            best[key] = r
    for r in best.values():
        r["best"] = True
    summary = {}
    for (var, rec, res), r in best.items():
        s = summary.setdefault(str(res), {})
        s[f"{var}/{rec}"] = {"samples_per_s": r["samples_per_s"], "compiled": r["compiled"],
                             "compile_mode": r.get("compile_mode"),
                             "mfu_bf16_peak": r.get("mfu_bf16_peak")}
    for res, s in summary.items():
        base = s.get("bf16/off") or s.get("fp32/off")
        for fp8 in VARIANTS[1:]:
            if base and f"{fp8}/off" in s:
                s[f"{fp8}_speedup_vs_{'bf16' if 'bf16/off' in s else 'fp32'}"] = round(s[f"{fp8}/off"]["samples_per_s"] / base["samples_per_s"], 3)
        for var in ("fp32",) + VARIANTS:
            if f"{var}/off" in s and f"{var}/on" in s:
                s[f"{var}_recon_slowdown"] = round(
                    1 - s[f"{var}/on"]["samples_per_s"] / s[f"{var}/off"]["samples_per_s"], 4)
    return summary


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sd3_light" if cuda else "tiny", choices=["tiny", "sd3_light"])
    ap.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--hidden-size", type=int, default=None,
                    help="override the preset's width (heads of 64, MLP 4x): where FP8 starts to pay")
    ap.add_argument("--resolution", type=int, nargs="+", default=None,
                    help="pixels (latent = res/8); default: 256 1024 on GPU, 64 on CPU")
    ap.add_argument("--micro-batch-size", type=int, nargs="+", default=None,
                    help="one per resolution (or one for all); default GPU: 32 at <=512 px, 4 above; CPU: 4")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 10, CPU 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (GPU 3, CPU 2)")
    ap.add_argument("--variants", nargs="+", default=["bf16", "fp8-local", "fp8-te"])
    ap.add_argument("--recon", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--compile", default="off", choices=["off", "on", "both", "graphs", "all"],
                    help="eager (off), compiled blocks (on), both, CUDA graphs of the blocks "
                         "(graphs: torch.compile mode reduce-overhead), or all three")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused"],
                    help="Megatron-LM's --attention-backend: torch SDPA kernel of the local filling")
    ap.add_argument("--profile", action="store_true",
                    help="after each row, profile 2 more iterations: device time per kernel class")
    ap.add_argument("--init", choices=["cpu", "device"], default=None,
                    help="weight init: device (GPU default: fast) or cpu (layout-independent)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; skip the rest after")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--rows-jsonl", default=None,
                    help="append each row here as one JSON line as soon as it is measured")
    ap.add_argument("--tag", default=None, help="a name for this run's rows in --rows-jsonl")
    args = ap.parse_args(argv)
    args.resolution = args.resolution or ([256, 1024] if cuda else [64])
    if args.micro_batch_size is None:
        mbs = [(32 if r <= 512 else 4) if cuda else 4 for r in args.resolution]
    elif len(args.micro_batch_size) == 1:
        mbs = args.micro_batch_size * len(args.resolution)
    else:
        mbs = args.micro_batch_size
    if len(mbs) != len(args.resolution):
        raise SystemExit("--micro-batch-size: give one value, or one per --resolution")
    args.iters = args.iters or (10 if cuda else 5)
    args.init = args.init or ("device" if cuda else "cpu")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    if args.hidden_size is not None and (args.hidden_size <= 0 or args.hidden_size % 64):
        raise SystemExit(f"--hidden-size {args.hidden_size}: must be a positive multiple of 64 (heads of 64)")
    for r in args.resolution:
        if r % 16:
            raise SystemExit(f"--resolution {r}: must be a multiple of 16 (latent = res/8, patch 2)")

    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model gains nothing from threads, and OpenMP spin-waiting next to other busy
        # processes made ms/iter swing 30 ms <-> 2 s on a shared 2-core machine.
        torch.set_num_threads(1)
    with quiet():
        from megatron_sd3.distributed import initialize_distributed

        info = initialize_distributed(1, 1, seed=1234)
    dev = info.device
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    log(f"device: {device_name}; torch {torch.__version__}")
    comp = {"off": [None], "on": ["default"], "both": [None, "default"], "graphs": ["reduce-overhead"],
            "all": [None, "default", "reduce-overhead"]}[args.compile]
    rows = []
    meta = dict(device=device_name, cuda=cuda, torch=torch.__version__, preset=args.preset,
                attention_backend=args.attention_backend,
                cpu_threads=None if cuda else torch.get_num_threads(),
                num_layers=args.num_layers, hidden_size=args.hidden_size, iters=args.iters,
                warmup=args.warmup,
                flop_count="megatron_sd3.flops.model_flops_per_sample(training=True): blocks, "
                           "embedders and head, unpadded text tokens",
                optimizer="megatron get_megatron_optimizer: adam (AdamW, wd 0.01), clip 1.0")
    try:
        import megatron.core
        import torchao

        meta.update(megatron_core=megatron.core.__version__, torchao=torchao.__version__)
    except Exception:  # noqa: BLE001
        pass

    def save(final=False):
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
            out = dict(meta, rows=rows, complete=final, wall_s=round(time.time() - T0, 1))
            if final:
                out["summary"] = summarize(rows)
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)

    def over_budget():
        return args.time_budget is not None and time.time() - T0 > args.time_budget

    # recon outer, precision inner: with a time budget the bf16-vs-FP8 pair comes first
    todo = variants(cuda, args.variants)
    for rec in args.recon:
        for name, fp8, impl, bf16 in todo:
            gamma = 0.5 if rec == "on" else 0.0
            base = dict(variant=name, text_recon=rec)
            if over_budget():
                log("skipped (time budget):", base)
                rows.append({**base, "error": "skipped: time budget"})
                continue
            log("building", base)
            try:
                built = Built(args, name, fp8, impl, bf16, gamma, dev)
            except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
                rows.append({**base, "error": f"build: {type(e).__name__}: {str(e)[:300]}"})
                log("-> build failed:", rows[-1]["error"])
                continue
            log(f"built in {built.build_s}s, {built.params_m}M params")
            for c in comp:
                if c:
                    try:
                        built.compile(c)
                    except Exception as e:  # noqa: BLE001 - e.g. CUDA graphs without CUDA
                        rows.append({**base, "compiled": True, "compile_mode": c,
                                     "error": f"compile: {type(e).__name__}: {str(e)[:300]}"})
                        log("-> compile refused:", rows[-1]["error"])
                        continue
                for res, mb in zip(args.resolution, mbs):
                    here = {**base, "resolution": res, "micro_batch": mb, "compiled": bool(c),
                            "compile_mode": c}
                    if over_budget():
                        log("skipped (time budget):", here)
                        rows.append({**here, "error": "skipped: time budget"})
                        continue
                    log("running", here)
                    try:
                        row = built.measure(res, mb)
                    except Exception as e:  # noqa: BLE001
                        msg = str(e).splitlines()[0][:300] if str(e) else ""
                        row = {**here, "error": f"{type(e).__name__}: {msg}"}
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                    log("->", {k: row.get(k) for k in (
                        "ms_per_iter", "samples_per_s", "tflops_per_device", "mfu_bf16_peak",
                        "peak_mem_GiB", "warmup_s", "error") if k in row})
                    rows.append(row)
                    save()
                    if args.rows_jsonl:
                        with open(args.rows_jsonl, "a") as fh:
                            fh.write(json.dumps(dict(tag=args.tag, device=device_name, **row)) + "\n")
            built.free()
            del built
    summary = summarize(rows)
    print(f"\nSD3 MMDiT training throughput: preset {args.preset}, device {device_name}, "
          f"{args.warmup} warmup + {args.iters} timed iterations, TP=PP=DP=1")
    print(fmt_table(rows, cuda))
    for res, s in summary.items():
        extra = {k: v for k, v in s.items() if not isinstance(v, dict)}
        if extra:
            print(f"{res} px:", ", ".join(f"{k} {v}" for k, v in extra.items()))
    save(final=True)
    if args.json:
        log("wrote", args.json)
    result = dict(meta, rows=rows, summary=summary)
    return result


if __name__ == "__main__":
    main()
