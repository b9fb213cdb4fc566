"""torchrun worker for tests/multiprocess/test_recompute.py: the same two optimizer steps of the tiny preset
with every activation-recompute mode, in one process group, in float64 (tests/_bounds.py).

For each text-reconstruction weight in ``--gammas`` and each mode (none, full uniform 1 and 2,
full block 1, selective) it builds the model afresh (same initialisation), runs two steps and
records the losses, the gradients of the first step (DDP's ``main_grad``, this rank's shards,
by local name), the parameters before the first step and after the second (Adam made linear in
the gradients, tests/_bounds.py) and, with one stage, the bytes this rank saves
for backward in one forward next to the planner's figure. Writes ``OUT/rank{R}.pt``.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _bounds import ADAM_EPS, LR  # noqa: E402
from _float64 import float64_runs_megatron_fp32_paths  # noqa: E402

MODES = {
    "none": {},
    "full_uniform1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None, help="virtual stages per pipeline rank")
    ap.add_argument("--gammas", default="0,0.5")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    float64_runs_megatron_fp32_paths()

    from megatron.core import parallel_state as ps

    from megatron_sd3.config import make_config
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.build import build_training, unwrap
    from megatron_sd3.training.step import TrainStep

    info = initialize_distributed(a.tp, a.pp, vpp=a.vpp, seed=1234)
    vpp = dict(virtual_pipeline_model_parallel_size=a.vpp, overlap_p2p_comm=True, batch_p2p_comm=False) if a.vpp else {}
    gbs, mbs, layers = 4, 1, 4
    ds = MockDataset(100, latent_size=(8, 6), in_channels=16, text_len=16, text_dim=32, pooled_dim=32, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = {}
    for gamma in (float(g) for g in a.gammas.split(",")):
        for mode, rec in MODES.items():
            cfg = make_config("tiny", num_layers=layers, zero_init_adaln=False, text_recon_gamma=gamma,
                              text_recon_target_layer=1 if gamma else 0,
                              parallel=dict(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                            params_dtype=torch.float64,
                                            **pipeline_config_fields(layers, a.pp, None), **vpp, **rec))
            built = build_training(cfg, optimizer=dict(lr=LR, adam_eps=ADAM_EPS, clip_grad=1.0))
            chunks, ddp, opt = built.chunks, built.ddp, built.optimizer
            params0 = {n: p.detach().clone() for c in chunks for n, p in unwrap(c).named_parameters()}
            step = TrainStep(cfg, ddp, opt, global_batch_size=gbs, micro_batch_size=mbs, seed=42)
            losses, grads = [], {}
            for it in range(2):
                mb = None
                if step.first or step.last:
                    per = gbs // dp
                    mb = [{k: torch.stack([ds[it * gbs + dp_rank * per + m * mbs + j][k] for j in range(mbs)])
                           for k in ds[0]} for m in range(per // mbs)]
                res = step(mb, it * gbs)
                assert not res.skipped
                losses.append(res.losses)
                if it == 0:
                    grads = {n: p.main_grad.clone() for c in chunks for n, p in unwrap(c).named_parameters()
                             if p.requires_grad}
            params = {n: p.detach().clone() for c in chunks for n, p in unwrap(c).named_parameters()}
            results[(gamma, mode)] = {"losses": losses, "grads": grads, "params": params, "params0": params0}
            if a.pp == 1:  # one stage: this rank's saved bytes next to the planner's, under TP
                from megatron_sd3.memory import measure_saved_bytes, planned_saved_bytes

                results[(gamma, mode)]["saved"] = (measure_saved_bytes(unwrap(chunks[0]), (8, 6), 2),
                                                   planned_saved_bytes(cfg, (8, 6), 2, tp=a.tp))
    torch.save({"results": results}, os.path.join(a.out, f"rank{info.rank}.pt"))


if __name__ == "__main__":
    main()
