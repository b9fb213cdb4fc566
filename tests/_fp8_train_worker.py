"""torchrun-style worker for tests/multiprocess/test_fp8_training.py: a few optimizer steps of the tiny preset
in FP8 (``--fp8 hybrid|e4m3``, local backend: torchao float8 GEMMs inside megatron-core's
parallel linears) and/or bf16 (``--bf16``), through the real training path (megatron schedules,
DDP, megatron optimizer, ``TrainStep``), on CPU with gloo (or on a GPU if one is present).

Started by ``tests/_ranks.py::run_ranks`` (1, 2 or 4 processes). Writes ``OUT/rank{R}.pt``:

* ``losses``: per-step global losses of the run asked for (all ranks agree);
* ``grad_norms``: per-step grad norms;
* ``scaled_mm_calls``: how many ``torch._scaled_mm`` calls this rank made (proves FP8 ran);
* ``params``: full (TP-gathered) parameters of this rank's stage after ``--snapshot-at`` steps
  (default: all steps), keyed by global name, fp32;
* ``moved``: names (local) of this rank's parameters that training changed;
* ``ref_losses`` / ``ref_grad_norms`` (with ``--ref fp32|bf16``): the same training without FP8
  (fp32, or bf16 params), run first in the same process from the same initial weights and data
  (saves a process start in the tests; on a GPU ``--ref bf16`` is the FP8-vs-bf16 check).

``--preset sd3_light --num-layers 2 --latent 32 --text-len 333`` gives SD3-sized blocks (hidden
1536, 24 heads, 4096-wide text) for the GPU check in ``tools/gpu_check.sh``.

With ``--bf16`` the model is wrapped in megatron's ``Float16Module`` as Megatron-LM does for
``--bf16`` (params, embedders and head in bf16; fp32 master weights in megatron's
``Float16OptimizerWithFloat16Params``), by ``build_training`` as every training run.
megatron-core 0.16's ``Float16Module`` casts only *positional* inputs to bf16, and ``TrainStep``
calls the model with keywords, so ``TrainStep`` hands the first stage its inputs in bf16.
"""
import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def count_scaled_mm():
    """Wrap torch._scaled_mm (what torchao's float8 mm dispatches to); returns the call list."""
    calls = []
    orig = torch._scaled_mm

    def wrapped(a, b, *args, **kwargs):
        calls.append(1)
        return orig(a, b, *args, **kwargs)

    torch._scaled_mm = wrapped
    return calls


def microbatches(ds, it, gbs, mbs, dp, dp_rank):
    per_rank = gbs // dp
    consumed = it * gbs
    out = []
    for m in range(per_rank // mbs):
        idx = [consumed + dp_rank * per_rank + m * mbs + j for j in range(mbs)]
        samples = [ds[i] for i in idx]
        out.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
    return out


def _wide(v: torch.Tensor) -> torch.Tensor:
    """fp32 (bf16 parameters widened), float64 kept."""
    return v if v.dtype == torch.float64 else v.float()


def train(a, fp8, bf16, steps, snapshot_at=None):
    """One training run; returns (losses, grad_norms, params snapshot or None, the initial params
    (full tensors, with a snapshot) or None, names of this rank's parameters that changed during
    training)."""
    from megatron.core import parallel_state as ps

    from megatron_sd3.config import make_config
    from megatron_sd3.convert import gather_full_state_dict
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.build import build_training, unwrap
    from megatron_sd3.training.step import TrainStep

    parallel = dict(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, context_parallel_size=a.cp,
                    **pipeline_config_fields(a.num_layers, a.pp, None))
    if fp8:
        parallel["fp8"] = fp8  # make_config pads text to 16
        parallel["fp8_recipe"] = a.fp8_recipe
    if bf16:
        parallel.update(bf16=True, params_dtype=torch.bfloat16)
    if a.float64:
        parallel.update(params_dtype=torch.float64)
    overrides = dict(num_layers=a.num_layers, text_seq_len=a.text_len)
    cfg = make_config(a.preset, zero_init_adaln=False, text_recon_gamma=a.gamma,
                      text_recon_target_layer=a.target, parallel=parallel, **overrides)
    eps = {} if a.adam_eps is None else {"adam_eps": a.adam_eps}
    built = build_training(cfg, optimizer=dict(lr=a.lr, weight_decay=0.01, clip_grad=1.0, **eps))
    chunks, ddp, opt = built.chunks, built.ddp, built.optimizer
    step = TrainStep(cfg, ddp, opt, global_batch_size=a.gbs, micro_batch_size=a.mbs, seed=42)
    lat = (a.latent, a.latent) if a.latent else (8, 6)
    ds = MockDataset(1000, latent_size=lat, in_channels=cfg.in_channels, text_len=a.text_len,
                     text_dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    init = {}
    for c in chunks:
        init.update({k: v.detach().clone() for k, v in unwrap(c).named_parameters()})
    losses, norms, params, params0 = [], [], None, None
    if snapshot_at is not None and not a.no_params:
        params0 = {}
        for c in chunks:
            params0.update({k: _wide(v) for k, v in gather_full_state_dict(unwrap(c)).items()})
    for it in range(steps):
        mbs = microbatches(ds, it, a.gbs, a.mbs, dp, dp_rank) if (step.first or step.last) else None
        res = step(mbs, it * a.gbs)
        assert not res.skipped, f"step {it} skipped: {res.losses}"
        losses.append(res.losses)
        norms.append(res.grad_norm)
        if snapshot_at is not None and it + 1 == snapshot_at and not a.no_params:
            params = {}
            for c in chunks:
                params.update({k: _wide(v) for k, v in gather_full_state_dict(unwrap(c)).items()})
    moved = sorted(k for c in chunks for k, v in unwrap(c).named_parameters() if not torch.equal(v, init[k]))
    return losses, norms, params, params0, moved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd3_light"])
    ap.add_argument("--latent", type=int, default=None, help="square latent side (default 8x6)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=13,
                    help="text tokens per sample; 13 makes FP8 mode pad the text stream to 16")
    ap.add_argument("--fp8", choices=["none", "hybrid", "e4m3"], default="none")
    ap.add_argument("--fp8-recipe", choices=["tensorwise", "rowwise"], default="tensorwise")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--float64", action="store_true",
                    help="float64 parameters and arithmetic around the FP8 casts (tests/_float64.py)")
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--snapshot-at", type=int, default=None, help="params after this many steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--adam-eps", type=float, default=None, help="Adam's eps (default: megatron's 1e-8)")
    ap.add_argument("--no-params", action="store_true", help="do not save parameters (big models)")
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--ref", choices=["none", "fp32", "bf16"], default="none",
                    help="also run this non-FP8 reference first, in the same process")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from megatron_sd3.distributed import initialize_distributed

    info = initialize_distributed(a.tp, a.pp, seed=1234, cp=a.cp)
    if a.float64:
        from _float64 import float64_runs_megatron_fp32_paths, scaled_mm_in_float64

        float64_runs_megatron_fp32_paths()
        scaled_mm_in_float64()
    out = {}
    if a.ref != "none":
        out["ref_losses"], out["ref_grad_norms"], _, _, _ = train(a, None, a.ref == "bf16", a.steps)
    calls = count_scaled_mm()
    fp8 = None if a.fp8 == "none" else a.fp8
    snap = a.snapshot_at or a.steps
    out["losses"], out["grad_norms"], out["params"], out["params0"], out["moved"] = train(a, fp8, a.bf16, a.steps,
                                                                                         snap)
    out["scaled_mm_calls"] = len(calls)
    torch.save(out, os.path.join(a.out, f"rank{info.rank}.pt"))
    if info.rank == 0:  # a short summary for logs (the GPU check reads it)
        line = {"fp8": a.fp8, "bf16": a.bf16, "steps": a.steps, "scaled_mm_calls": len(calls),
                "loss": [round(x["loss"], 5) for x in out["losses"]]}
        if "ref_losses" in out:
            ref = [x["loss"] for x in out["ref_losses"]]
            line["ref"] = a.ref
            line["ref_loss"] = [round(x, 5) for x in ref]
            line["max_rel_loss_gap"] = max(abs(x["loss"] - r) / abs(r) for x, r in zip(out["losses"], ref))
        print("FP8_TRAIN_SUMMARY", json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
