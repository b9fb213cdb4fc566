"""``python -m megatron_sd3.env [pretrain args]``: what this environment has, and what a run will use.

One screen, before any GPU hour is spent (``docs/design.md``, section "Environment report"):

* the environment: Python, torch (with its CUDA, cuDNN and NCCL), the GPUs torch sees (name,
  memory, compute capability, FP8-capable or not), and each package the project uses or can use
  (megatron-core, Transformer Engine, apex, torchao, nvidia-resiliency-ext, webdataset,
  diffusers, wandb): its version or ``absent``;
* the run that ``pretrain_sd3.py`` would start with the same flags: the transformer filling,
  precision, the attention kernel torch's SDPA picks for the run's head size and dtype, FP8
  (format, recipe, backend), the optimizer and the gradient-norm / multi-tensor kernels that
  megatron-core took (Transformer Engine's, apex's or torch's), torch.compile, fault tolerance;
  each fallback with its reason.

The flags go through ``pretrain_sd3.py``'s own checks first (``preflight``): a run that asks for
what is absent (``--transformer-impl transformer_engine`` without Transformer Engine, FP8 on a GPU
below compute capability 8.9, ...) is one line on stderr and exit code 2, and nothing is printed
on stdout. ``WORLD_SIZE`` is the world the layout is checked for (default: the GPUs here, or TP x PP x CP
when that is more).
``pretrain_sd3.py --check-config`` prints the same report once its checks pass, so ``launch.sh``
shows it once before the ranks start.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import sys
from typing import Optional

#: Optional packages: (label, distribution names to try, module that must import).
PACKAGES = (
    ("megatron-core", ("megatron-core", "megatron_core"), "megatron.core"),
    ("Transformer Engine", ("transformer_engine", "transformer-engine", "transformer_engine_torch"),
     "transformer_engine.pytorch"),
    # the "apex" name on PyPI is an unrelated project: apex counts when NVIDIA's fused kernels import
    ("apex", ("apex",), "amp_C"),
    ("torchao", ("torchao",), "torchao"),
    ("nvidia-resiliency-ext", ("nvidia-resiliency-ext", "nvidia_resiliency_ext"), "nvidia_resiliency_ext"),
    ("webdataset", ("webdataset",), "webdataset"),
    ("diffusers", ("diffusers",), "diffusers"),
    ("wandb", ("wandb",), "wandb"),
)

#: The first compute capability with FP8 tensor cores (Ada sm_89; Hopper sm_90, Blackwell sm_100).
FP8_MIN_CAPABILITY = (8, 9)


def _dist_version(names) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_version(label: str) -> Optional[str]:
    """The installed version of one of :data:`PACKAGES` (``None``: absent or not importable)."""
    for name, dists, module in PACKAGES:
        if name == label:
            break
    else:
        raise KeyError(label)
    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, or a broken install raising at import: absent for the run
        return None
    return _dist_version(dists) or getattr(mod, "__version__", None) or "installed (version unknown)"


def _cudnn_version() -> Optional[str]:
    import torch

    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not v:
        return None
    # cuDNN 9 encodes major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def torch_line() -> str:
    import torch

    if torch.version.cuda is None:
        return f"{torch.__version__} (CPU build: no CUDA)"
    parts = [f"CUDA {torch.version.cuda}", f"cuDNN {_cudnn_version() or 'absent'}"]
    try:
        parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
    except Exception:  # a build without NCCL
        parts.append("NCCL absent")
    return f"{torch.__version__} ({', '.join(parts)})"


def gpus() -> list[dict]:
    """The GPUs torch sees: name, memory (GiB), compute capability, FP8-capable."""
    import torch

    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = (p.major, p.minor)
        out.append(dict(name=p.name, memory_gib=p.total_memory / 2**30, capability=cc,
                        fp8=cc >= FP8_MIN_CAPABILITY))
    return out


def gpu_line(devices: list[dict]) -> str:
    if not devices:
        return "none (ranks run on CPU with gloo, in fp32)"
    groups: dict[tuple, int] = {}
    for d in devices:
        key = (d["name"], round(d["memory_gib"], 1), d["capability"], d["fp8"])
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{n} x {name}, {mem} GiB, sm_{cc[0]}{cc[1]}, FP8 {'yes' if fp8 else 'no (needs sm_89+)'}"
                     for (name, mem, cc, fp8), n in groups.items())


def environment_rows() -> list[tuple[str, str]]:
    rows = [("Python", f"{platform.python_version()} ({sys.executable})"), ("torch", torch_line()),
            ("GPUs", gpu_line(gpus()))]
    rows += [(label, package_version(label) or "absent") for label, _, _ in PACKAGES]
    return rows


# ---- what a run will use ------------------------------------------------------------------------

def kernel_sources() -> dict[str, str]:
    """Where megatron-core took its fused kernels from, as its modules chose at import: ``te``,
    ``apex`` or ``torch`` for the Adam optimizer and for the gradient-norm / multi-tensor ops."""
    from megatron.core import optimizer as mopt
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    from megatron_sd3.training import multi_tensor

    def origin(module: str) -> str:
        return "te" if module.startswith("transformer_engine") else "apex" if module.startswith(("apex", "amp_C")) \
            else "torch"

    l2 = clip_grads.l2_norm_impl
    local = l2 in (mutils.local_multi_tensor_l2_norm, multi_tensor.foreach_l2_norm)
    return {"adam": origin(getattr(mopt.Adam, "__module__", "torch")),
            "multi_tensor": "torch" if local else origin(getattr(l2, "__module__", None) or "amp_C")}


def sdpa_kernel_choice(device: str, dtype, heads: int, head_dim: int, attention_backend: str) -> str:
    """The kernel torch's ``scaled_dot_product_attention`` picks for [1, heads, 256, head_dim]
    q/k/v of ``dtype`` on ``device`` under the run's ``--attention-backend`` (the model calls it
    without a mask; ``backends/local.py`` maps the flag onto torch's kernels), or the reason none
    can run."""
    import torch
    from megatron.core.transformer.enums import AttnBackend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_sd3.backends.local import SDPACoreAttention

    names = {SDPBackend.MATH: "math (unfused)", SDPBackend.FLASH_ATTENTION: "FlashAttention",
             SDPBackend.EFFICIENT_ATTENTION: "memory-efficient attention",
             SDPBackend.CUDNN_ATTENTION: "cuDNN fused attention"}
    q = torch.zeros(1, heads, 256, head_dim, device=device, dtype=dtype)
    allowed = SDPACoreAttention.BACKENDS[AttnBackend[attention_backend]]
    try:
        if allowed is None:
            choice = torch._fused_sdp_choice(q, q, q)
        else:
            with sdpa_kernel(allowed):
                choice = torch._fused_sdp_choice(q, q, q)
    except RuntimeError as e:
        return f"none can run: {str(e).splitlines()[0]}"
    by_value = {int(b): b for b in names}
    kernel = by_value.get(int(choice))
    if kernel is None:
        return f"none can run (torch's choice {int(choice)})"
    return names[kernel] + (" (CPU kernel)" if device == "cpu" and kernel != SDPBackend.MATH else "")


def te_attention_env(attention_backend: str) -> str:
    """The ``NVTE_*`` variables megatron-core's own mapping sets for ``--attention-backend`` (what
    ``SD3Model`` runs before Transformer Engine picks a kernel), computed in a copy of the
    environment; megatron's refusal of a conflicting ``NVTE_*`` already set, when it refuses."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnBackend

    from megatron_sd3.compat import set_te_attention_backend

    saved = dict(os.environ)
    try:
        set_te_attention_backend(SimpleNamespace(attention_backend=AttnBackend[attention_backend]))
        return " ".join(f"{v}={os.environ[v]}" for v in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
                        if v in os.environ)
    except AssertionError as e:
        return f"refused by megatron-core: {e}"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def fp8_device_problem(devices: list[dict]) -> Optional[str]:
    """The one line refusing FP8 on these GPUs (any below sm_89), or None (CPU: torch's
    ``_scaled_mm`` CPU kernel runs it, for tests)."""
    old = [d for d in devices if not d["fp8"]]
    if not old:
        return None
    d = old[0]
    return (f"--fp8-format needs GPUs of compute capability 8.9 or newer (Ada, Hopper, Blackwell: "
            f"FP8 tensor cores); this {d['name']} is sm_{d['capability'][0]}{d['capability'][1]}: "
            f"drop --fp8-format (train in bf16) or run on H100 / H200 / L40S / B200 nodes")


def _fp8_line(args, backend: str, on_gpu: bool) -> str:
    if not args.fp8_format:
        return "off (--fp8-format not given)"
    fmt = {"e4m3": "e4m3 (inputs, weights and gradients)",
           "hybrid": "hybrid (e4m3 forward, e5m2 gradients)"}[args.fp8_format]
    if backend == "transformer_engine":
        recipe = {"tensorwise": "TE Float8CurrentScaling (dynamic per-tensor scales)",
                  "delayed": f"TE DelayedScaling (amax history {args.fp8_amax_history_len})"}[args.fp8_recipe]
        where = "Transformer Engine modules under megatron-core's fp8 context"
    else:
        recipe = {"tensorwise": "torchao tensorwise (dynamic per-tensor scales, amax agreed over TP)",
                  "rowwise": "torchao rowwise (dynamic per-row scales, powers of two)"}[args.fp8_recipe]
        where = "torchao float8 linears (--transformer-impl local)"
    line = f"{fmt}, {recipe}; {where}"
    if args.first_last_layers_bf16:
        line += "; first and last joint blocks in bf16"
    if not on_gpu:
        line += "; on CPU through torch._scaled_mm's CPU kernel (correctness only, not speed)"
    return line


def _fp8_gemms_line(args, plan: dict, backend: str) -> str:
    """Which joint-block GEMMs run in FP8 (``--fp8-gemms``; the rule: backends/fp8_settings.py)."""
    if backend == "transformer_engine":
        return ("all: Transformer Engine runs every TE module of its FP8 region in FP8 (--fp8-gemms rule is "
                "not applied with TE)")
    if args.fp8_gemms == "all":
        return "all joint-block GEMMs (--fp8-gemms all)"
    import torch

    from megatron_sd3.arguments import mock_latent_hw
    from megatron_sd3.backends.fp8_settings import model_gpu
    from megatron_sd3.config import make_config
    from megatron_sd3.step_time import plan as step_plan

    cfg = make_config(plan["preset"], **plan["fields"])
    hw = mock_latent_hw(args, cfg.sample_size)
    where = f"{hw[0]}x{hw[1]} latents" if args.mock_latent_size else f"the model's {hw[0]}x{hw[1]} latents"
    gpu = model_gpu(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    rows = step_plan(cfg, hw, args.micro_batch_size, gpu, tp=args.tensor_model_parallel_size,
                     cp=args.context_parallel_size)["gemms"]
    fp8 = sorted({r["name"] for r in rows if r["fp8"]})
    kept = sorted({r["name"] for r in rows if not r["fp8"] and r["fp8_ms"] is not None} - set(fp8))
    said = (f"FP8 for {', '.join(fp8)}; bf16 for {', '.join(kept) or 'none'}" if fp8 else
            f"none pays, every GEMM bf16 ({len(kept)} shapes; --fp8-gemms all forces FP8)")
    return (f"rule, modelled on {gpu.upper()} at micro batch {args.micro_batch_size} and {where} "
            f"(tools/fp8_plan.py): {said}")


def run_rows(args, plan: dict) -> list[tuple[str, str]]:
    """What ``pretrain_sd3.py`` with ``args`` (checked by ``preflight``, which gave ``plan``) will use."""
    import torch

    from megatron_sd3.backends import backend_name_for

    mf = plan["model_fields"]
    on_gpu = torch.cuda.is_available()
    backend = backend_name_for(args.transformer_impl, bool(args.fp8_format))
    rows = []
    if args.transformer_impl == "transformer_engine":
        rows.append(("transformer impl", "transformer_engine: TE linears, norms and DotProductAttention "
                                         "(megatron-core's TESpecProvider)"))
    else:
        te_note = ("; Transformer Engine is installed: --transformer-impl transformer_engine uses it"
                   if package_version("Transformer Engine") else "")
        rows.append(("transformer impl", "local: megatron-core parallel linears, torch norms, torch SDPA "
                                         "core attention" + te_note))
    bf16 = bool(args.bf16 and on_gpu)
    rows.append(("precision", "bf16 parameters and activations, fp32 gradients and optimizer" if bf16 else
                 "fp32 (--bf16 needs CUDA: a CPU run stays in fp32)" if args.bf16 else
                 "fp32 (add --bf16 on GPUs)"))
    heads = mf["num_attention_heads"] // (args.tensor_model_parallel_size * args.context_parallel_size)
    head_dim = mf["hidden_size"] // mf["num_attention_heads"]
    if args.transformer_impl == "transformer_engine":
        rows.append(("attention", f"TE DotProductAttention, --attention-backend {args.attention_backend}: "
                     f"{te_attention_env(args.attention_backend)} (megatron-core's mapping; TE picks "
                     f"among the kernels left at 1)"))
    else:
        dtype = torch.bfloat16 if bf16 else torch.float32
        kernel = sdpa_kernel_choice("cuda" if on_gpu else "cpu", dtype, heads, head_dim, args.attention_backend)
        rows.append(("attention", f"torch SDPA, --attention-backend {args.attention_backend}: {kernel} "
                     f"for {str(dtype).replace('torch.', '')}, {heads} heads of {head_dim} per rank"))
    rows.append(("FP8", _fp8_line(args, backend, on_gpu)))
    if args.fp8_format:
        rows.append(("FP8 GEMMs", _fp8_gemms_line(args, plan, backend)))
    k = kernel_sources()
    names = {"te": "Transformer Engine's", "apex": "apex's"}
    dist_opt = "distributed optimizer" if args.use_distributed_optimizer else "plain optimizer"
    if k["adam"] == "torch":
        adam = (f"torch AdamW ({'fused=True, one kernel' if on_gpu else 'foreach; fused=True on CUDA'}), "
                f"{dist_opt}: megatron-core's fallback, as neither TE's nor apex's FusedAdam is installed")
    else:
        adam = f"{names[k['adam']]} FusedAdam (megatron-core's choice), {dist_opt}"
    rows.append(("optimizer", adam))
    rows.append(("grad norm, multi-tensor", "torch _foreach kernels (megatron_sd3.training.multi_tensor): "
                 "neither TE's nor apex's multi-tensor kernels are installed" if k["multi_tensor"] == "torch"
                 else f"{names[k['multi_tensor']]} multi-tensor kernels (megatron-core's choice)"))
    rows.append(("torch.compile", f"on, each joint block (mode {args.torch_compile_mode or 'default'})"
                 if args.torch_compile else "off (--torch-compile)"))
    rows.append(("fault tolerance", "nvidia-resiliency-ext rank monitors (launch.sh runs ft_launcher)"
                 if args.enable_ft_package else "off (--enable-ft-package)"))
    return rows


def _block(title: str, rows) -> list[str]:
    lines = [f"{'-' * 24} {title} {'-' * max(3, 35 - len(title))}"]
    lines += [f"  {k} {'.' * max(1, 26 - len(k))} {v}" for k, v in rows]
    return lines


def report(args=None, plan: Optional[dict] = None) -> str:
    """The environment block, and the run's block when ``args`` / ``plan`` are given."""
    lines = _block("environment", environment_rows())
    if args is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        lines += _block("this run", [("world size", f"{world} = TP {args.tensor_model_parallel_size} x PP "
                                      f"{args.pipeline_model_parallel_size} x CP {args.context_parallel_size} "
                                      f"x DP {plan['dp']} (WORLD_SIZE)"), *run_rows(args, plan)])
    lines.append("-" * 61)
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m megatron_sd3.env [pretrain args]``: the checks of ``pretrain_sd3.py
    --check-config``, then the report; a failed check is one line on stderr and exit code 2."""
    from megatron_sd3.quiet import silence_notices

    silence_notices()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(report(), flush=True)
        print("(give pretrain_sd3.py's flags, e.g. --config configs/sd3_light.toml --mock-data, "
              "to see what a run will use)", flush=True)
        return 0
    from megatron_sd3.arguments import parse_args
    from megatron_sd3.training.pretrain import check_run

    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:  # the GPUs here, or the smallest world the layout needs
        import torch

        smallest = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
        os.environ["WORLD_SIZE"] = str(max(torch.cuda.device_count(), smallest))
    checked = check_run(args=args)
    if isinstance(checked, int):
        return checked
    args, plan = checked
    print(report(args, plan), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
