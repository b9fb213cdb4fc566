"""Worker for tests/multiprocess/test_ema.py: the EMA of a bf16 model under DP=2 (CPU mode), with
megatron's Float16OptimizerWithFloat16Params and with the distributed optimizer.

    python tests/_ema_worker.py --case float16|distopt --out DIR      (2 ranks, tests/_ranks.py)

After every step the EMA must equal, bit for bit, a reference EMA of the full fp32 master weights
(gathered from the optimizer here) with diffusers' update rule; it must differ from an EMA of the
bf16 model weights. With the distributed optimizer each rank holds only its range of the EMA.
Then a checkpoint round trip: the EMA saved under DP=2 loads into a fresh sharded EMA and into
an unsharded one (what sampling and conversion build) with the same full values.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GBS, MBS, STEPS, DECAY = 4, 1, 3, 0.7


def full_masters(models, optimizer):
    """{name: full fp32 master weight} per chunk, gathered from the optimizer."""
    import torch.distributed as dist

    from megatron_sd3.training.ema import _dp_ranges

    ranges, group = _dp_ranges(optimizer)
    out = []
    for c in models:
        d = {}
        for n, p in c.named_parameters():
            main = getattr(p, "main_param", None)  # fp32 params are their own master
            if group is None or p not in ranges:  # no distributed optimizer / a frozen param
                d[n] = (p if main is None else main).detach().float().clone()
                continue
            flat = torch.zeros(p.numel(), dtype=torch.float32)
            r = ranges[p]
            if r is not None:
                flat[r[0]:r[1]] = p.detach().view(-1)[r[0]:r[1]] if main is None else main
            dist.all_reduce(flat, group=group)
            d[n] = flat.view(p.shape)
        out.append(d)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("float16", "distopt"), required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_sd3.config import config_to_dict, make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.distributed import destroy_distributed, initialize_distributed
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.ema import EMA
    from megatron_sd3.training.step import TrainStep

    info = initialize_distributed(1, 1, seed=1)
    bf16 = torch.bfloat16
    cfg = make_config("tiny", num_layers=2, zero_init_adaln=False,
                      parallel=dict(bf16=True, params_dtype=bf16, pipeline_dtype=bf16))
    dist_opt = a.case == "distopt"
    built = build_training(cfg, optimizer=dict(lr=3e-3), use_distributed_optimizer=dist_opt,
                           ema_decay=DECAY, ema_warmup="ratio")
    ema, models = built.ema, built.models
    assert ema.sharded == dist_opt
    held = sum(t.numel() for s in ema.shadow for t in s.values())
    total = sum(p.numel() for c in models for p in c.parameters())
    if dist_opt:  # each rank holds only its range of the average
        assert held < total, (held, total)
    else:
        assert held == total
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=GBS, micro_batch_size=MBS, seed=3)
    ds = MockDataset(100, latent_size=(8, 8), in_channels=16, text_len=16, text_dim=32, pooled_dim=32, seed=2)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ref = [{n: t.clone() for n, t in d.items()} for d in full_masters(models, built.optimizer)]
    ref_bf16 = [{n: p.detach().float().clone() for n, p in c.named_parameters()} for c in models]
    for it in range(1, STEPS + 1):
        per = GBS // dp
        mbs = [{k: v.unsqueeze(0) for k, v in ds[(it - 1) * GBS + rank * per + m].items()} for m in range(per)]
        res = step(mbs, (it - 1) * GBS)
        assert not res.skipped
        ema.update(it)
        one_minus = 1 - min(DECAY, (1 + (it - 1)) / (10 + (it - 1))) if it > 1 else 1.0
        masters = full_masters(models, built.optimizer)
        for i, c in enumerate(models):
            names = list(ref[i])
            r = [ref[i][n] for n in names]
            torch._foreach_sub_(r, torch._foreach_sub(r, [masters[i][n] for n in names]), alpha=one_minus)
            rb = [ref_bf16[i][n] for n in names]
            params = dict(c.named_parameters())
            torch._foreach_sub_(rb, torch._foreach_sub(rb, [params[n].detach().float() for n in names]),
                                alpha=one_minus)
            got = ema.full(i)
            for n in names:
                assert torch.equal(got[n], ref[i][n]), f"step {it}: EMA of {n} is not the master weights' EMA"
            assert any(not torch.equal(got[n], ref_bf16[i][n]) for n in names), \
                "EMA equals the EMA of the bf16 weights: the masters were not used"
        frozen = [n for n, p in c.named_parameters() if not p.requires_grad]
        assert frozen and all(torch.equal(got[n], p.detach().float()) for n, p in c.named_parameters()
                              if not p.requires_grad), "frozen params must stay their own average"
    expected = [{n: t.clone() for n, t in ema.full(i).items()} for i in range(len(models))]

    # checkpoint round trip: DP-sharded EMA -> checkpoint -> fresh sharded EMA / unsharded EMA
    root = os.path.join(a.out, "ckpt")
    path = ckpt.save_checkpoint(root, STEPS, models, None, ema, None, consumed_samples=0, skipped_iters=0,
                                model_config=config_to_dict(cfg), run_config={})
    for label, fresh in (("same kind", EMA(models, DECAY, optimizer=built.optimizer)),
                         ("unsharded", EMA(models, DECAY))):
        for s in fresh.shadow:
            for t in s.values():
                t.zero_()
        ckpt.load_checkpoint(path, models, None, fresh, None, model_config=config_to_dict(cfg),
                             load_optim=False, load_rng=False)
        for i in range(len(models)):
            got = fresh.full(i)
            for n, t in expected[i].items():
                assert torch.equal(got[n], t), f"{label}: loaded EMA of {n} differs"
    print(f"EMA_WORKER_OK rank={info.rank} case={a.case}", flush=True)
    built.free()
    destroy_distributed()


if __name__ == "__main__":
    main()
