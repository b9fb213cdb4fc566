#!/usr/bin/env python
"""Transformer Engine against the local filling, on the same weights (bf16 and FP8).

    python tools/check_te.py                        # on a GPU machine with TE installed
    python tools/check_te.py --preset sd3_light --num-layers 2 --latent 32
    python tools/check_te.py --candidate local      # checks this tool itself (no TE needed)

Builds the SD3 MMDiT twice -- the reference with ``--transformer-impl local`` (megatron-core's
parallel linears, torch SDPA, no FP8) and the candidate (``transformer_engine`` by default) --
copies the reference's weights into the candidate (only TE's ``_extra_state`` may be missing),
then runs both on the same inputs with text reconstruction on, so both streams matter:

* ``bf16``: candidate without FP8, same dtype as the reference (bf16 on GPU, fp32 on CPU);
* ``fp8``: candidate with ``--fp8-format`` / ``--fp8-recipe`` (TE: megatron-core's FP8 context;
  local: torchao), after ``--warmup`` forward+backward passes so delayed scaling has an amax
  history.

For each case it prints the relative error (``||a - b|| / ||b||``) of the velocity, the final
text tokens and of every parameter's gradient (median and largest), and exits 1 if one is above
its bound (``--tol-bf16`` / ``--tol-fp8`` for the outputs and the median gradient, 3x that for the
largest gradient: small parameters such as the qk-norm weights sum over every head and token);
2 with one line when the candidate cannot be built (e.g. TE not installed). In FP8 the
gradients pass through e5m2 (``hybrid``): a few percent per element is that format's rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sd3.testing.helpers import rel  # noqa: E402


def build(args, impl: str, fp8: bool, dtype, dev):
    from megatron_sd3.config import make_config
    from megatron_sd3.models.sd3_model import SD3Model

    parallel = {"params_dtype": dtype, "bf16": dtype == torch.bfloat16}
    if fp8:
        parallel.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    overrides = dict(text_recon_gamma=0.5, text_recon_target_layer=0, zero_init_adaln=False)
    if args.num_layers:
        overrides["num_layers"] = args.num_layers  # the preset's first N blocks
    cfg = make_config(args.preset, parallel=parallel, **overrides)
    return SD3Model(cfg, transformer_impl=impl).to(device=dev, dtype=dtype)


def copy_weights(src, dst) -> None:
    """``dst`` gets ``src``'s weights; the only keys allowed to differ are TE's ``_extra_state``."""
    result = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise SystemExit(f"check_te.py: error: the fillings' parameters differ: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    for (n, a), (_, b) in zip(sorted(src.named_parameters()), sorted(dst.named_parameters())):
        assert torch.equal(a, b), n


def run(model, inputs, grad_out):
    """Forward + backward; (velocity, final text tokens, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    vel, text, _target = model(**inputs)
    (vel.float() * grad_out[0]).sum().add((text.float() * grad_out[1]).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return vel.detach(), text.detach(), grads


def compare(ref, cand) -> dict:
    vel_r, text_r, g_r = ref
    vel_c, text_c, g_c = cand
    if g_r.keys() != g_c.keys():
        raise SystemExit(f"check_te.py: error: different parameters received gradients: "
                         f"{sorted(g_r.keys() ^ g_c.keys())[:5]}")
    grad_err = {n: rel(g_c[n], g_r[n]) for n in g_r}
    worst = max(grad_err, key=grad_err.get)
    return {"velocity": rel(vel_c, vel_r), "text_tokens": rel(text_c, text_r),
            "grad_max": grad_err[worst], "grad_max_param": worst,
            "grad_median": float(torch.tensor(list(grad_err.values())).median())}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidate", default="transformer_engine", choices=["transformer_engine", "local"])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd3_light"])
    ap.add_argument("--num-layers", type=int, default=None, help="override the preset's block count")
    ap.add_argument("--latent", type=int, default=16, help="latent height = width (pixels / 8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--fp8-format", default="hybrid", choices=["e4m3", "hybrid"])
    ap.add_argument("--fp8-recipe", default=None, choices=["delayed", "tensorwise"],
                    help="default: delayed for TE, tensorwise for local (torchao)")
    ap.add_argument("--warmup", type=int, default=3, help="FP8 passes before the compared one")
    ap.add_argument("--tol-bf16", type=float, default=None, help="default 3e-2 (bf16), 1e-5 (fp32)")
    ap.add_argument("--tol-fp8", type=float, default=0.15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.fp8_recipe = args.fp8_recipe or ("delayed" if args.candidate == "transformer_engine" else "tensorwise")
    dtype = torch.bfloat16 if cuda else torch.float32
    tol_bf16 = args.tol_bf16 if args.tol_bf16 is not None else (3e-2 if cuda else 1e-5)
    if args.candidate == "transformer_engine":
        from megatron_sd3.backends.transformer_engine import transformer_engine_available

        if not transformer_engine_available():
            print("check_te.py: error: Transformer Engine is not installed here; run this on a machine "
                  "with TE (pip install transformer_engine[pytorch]), or --candidate local to check "
                  "the tool itself", file=sys.stderr)
            return 2
        if not cuda:
            print("check_te.py: error: Transformer Engine needs a CUDA GPU", file=sys.stderr)
            return 2

    from megatron_sd3.distributed import destroy_distributed, initialize_distributed

    info = initialize_distributed(1, 1, seed=1234)
    dev = info.device
    try:
        ref = build(args, "local", False, dtype, dev)
        g = torch.Generator().manual_seed(0)
        cfg = ref.config
        inputs = dict(
            hidden_states=torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, generator=g),
            encoder_hidden_states=torch.randn(args.batch, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(args.batch, cfg.pooled_projection_dim, generator=g),
        )
        inputs = {k: v.to(dev, dtype) for k, v in inputs.items()}
        inputs["timestep"] = torch.tensor([100.0 + 800.0 * i / max(1, args.batch - 1)
                                           for i in range(args.batch)], device=dev)
        n_img_px = args.latent
        grad_out = (torch.randn(args.batch, cfg.in_channels, n_img_px, n_img_px, generator=g).to(dev),
                    torch.randn(args.batch, cfg.text_seq_len, cfg.hidden_size, generator=g).to(dev))
        reference = run(ref, inputs, grad_out)
        report = {"device": torch.cuda.get_device_name() if cuda else "CPU", "dtype": str(dtype),
                  "candidate": args.candidate, "preset": args.preset, "num_layers": cfg.num_layers,
                  "fp8_format": args.fp8_format, "fp8_recipe": args.fp8_recipe, "cases": {}}
        failed = []
        for case, fp8, tol in (("bf16" if cuda else "fp32", False, tol_bf16), ("fp8", True, args.tol_fp8)):
            try:
                cand = build(args, args.candidate, fp8, dtype, dev)
            except (RuntimeError, ValueError, ImportError) as e:
                print(f"check_te.py: error: building the {args.candidate} filling ({case}) failed: "
                      f"{str(e).splitlines()[0]}", file=sys.stderr)
                return 2
            copy_weights(ref, cand)
            for _ in range(args.warmup if fp8 else 0):
                run(cand, inputs, grad_out)  # amax history for delayed scaling
            res = compare(reference, run(cand, inputs, grad_out))
            res["tolerance"] = tol
            res["ok"] = (max(res["velocity"], res["text_tokens"], res["grad_median"]) <= tol
                         and res["grad_max"] <= 3 * tol)
            report["cases"][case] = res
            if not res["ok"]:
                failed.append(case)
            print(f"{args.candidate:18s} {case:5s} vs local {'bf16' if cuda else 'fp32'}: "
                  f"velocity {res['velocity']:.2e}  text tokens {res['text_tokens']:.2e}  "
                  f"grads max {res['grad_max']:.2e} ({res['grad_max_param']}), "
                  f"median {res['grad_median']:.2e}  -> {'ok' if res['ok'] else 'ABOVE'} tol {tol:g}")
            del cand
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
        if failed:
            print(f"check_te.py: {', '.join(failed)} above tolerance", file=sys.stderr)
            return 1
        return 0
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
