"""torchrun worker for tests/multiprocess/test_parallel.py: a few optimizer steps of the tiny preset.

Writes, from every rank, ``OUT/rank{R}.pt`` with the losses and the gradient norm of each step (all
ranks agree), this rank's parameters before and after the steps as full (TP-gathered) tensors keyed
by global name, and the bytes of every pipeline p2p message it sends.

Adam runs with an eps far above every gradient element, so that its update is linear in the
gradients (tests/_bounds.py says why the bound needs this).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _bounds import ADAM_EPS, LR  # noqa: E402
from _float64 import float64_runs_megatron_fp32_paths  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks (image tokens split, Ulysses)")
    ap.add_argument("--pipeline-layers", default=None)
    ap.add_argument("--vpp", type=int, default=None, help="virtual stages per pipeline rank (interleaved 1F1B)")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--mask", action="store_true")
    ap.add_argument("--sequence-parallel", action="store_true", help="megatron's sequence parallelism (TP > 1)")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--text-pad-multiple", type=int, default=1, help="pad the text stream (as FP8 does)")
    ap.add_argument("--overlap", action="store_true",
                    help="distributed optimizer with overlapped grad reduce-scatter and param all-gather")
    ap.add_argument("--bucket-size", type=int, default=None, help="DDP bucket size (parameters)")
    ap.add_argument("--weighting-scheme", default=None, help="diffusers' density and loss weight")
    ap.add_argument("--precondition-outputs", action="store_true", help="the x0 target")
    ap.add_argument("--recompute", action="store_true", help="--recompute-granularity full, uniform, 1 block")
    ap.add_argument("--float64", action="store_true",
                    help="parameters, activations, pipeline messages, gradients and losses in float64 "
                         "(the data and the noise stay fp32: the same inputs at every layout)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import p2p_communication

    from megatron_sd3.config import make_config
    from megatron_sd3.convert import gather_full_state_dict
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.flow_matching import FlowMatchingConfig
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.build import build_training, params_synced
    from megatron_sd3.training.step import TrainStep

    info = initialize_distributed(a.tp, a.pp, vpp=a.vpp, seed=1234, cp=a.cp)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if a.recompute else {}
    vpp = dict(virtual_pipeline_model_parallel_size=a.vpp, overlap_p2p_comm=True, batch_p2p_comm=False) if a.vpp else {}
    dtype = dict(params_dtype=torch.float64) if a.float64 else {}
    if a.float64:
        float64_runs_megatron_fp32_paths()
    given = [int(v) for v in a.pipeline_layers.split(",")] if a.pipeline_layers else None
    cfg = make_config("tiny", num_layers=a.num_layers, zero_init_adaln=False, text_recon_gamma=a.gamma,
                      text_recon_target_layer=a.target, text_seq_len=a.text_len,
                      parallel=dict(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                    context_parallel_size=a.cp, **dtype,
                                    sequence_parallel=a.sequence_parallel, text_pad_multiple=a.text_pad_multiple,
                                    **pipeline_config_fields(a.num_layers, a.pp, given), **vpp, **recompute))
    overlap = dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True) \
        if a.overlap else {}
    built = build_training(cfg, optimizer=dict(lr=LR, adam_eps=ADAM_EPS, weight_decay=0.01, clip_grad=1.0),
                           ddp_bucket_size=a.bucket_size, **overlap)
    chunks, ddp, opt = built.chunks, built.ddp, built.optimizer
    flow = FlowMatchingConfig(weighting_scheme=a.weighting_scheme, precondition_outputs=a.precondition_outputs)
    step = TrainStep(cfg, ddp, opt, global_batch_size=a.gbs, micro_batch_size=a.mbs, seed=42, flow=flow)

    sent = []
    orig = p2p_communication.P2PCommunicator._communicate

    def recording(self, *args, tensor_send_next=None, **kw):
        if tensor_send_next is not None:
            sent.append((tuple(tensor_send_next.shape), tensor_send_next.numel() * tensor_send_next.element_size()))
        return orig(self, *args, tensor_send_next=tensor_send_next, **kw)

    p2p_communication.P2PCommunicator._communicate = recording

    ds = MockDataset(1000, latent_size=(8, 6), in_channels=16, text_len=a.text_len, text_dim=32, pooled_dim=32,
                     with_mask=a.mask, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = a.gbs // dp
    params0 = {}
    for c in chunks:
        params0.update(gather_full_state_dict(c))
    losses, grad_norms = [], []
    for it in range(a.steps):
        consumed = it * a.gbs
        mbs = None
        if step.first or step.last:
            mbs = []
            for m in range(per_rank // a.mbs):
                idx = [consumed + dp_rank * per_rank + m * a.mbs + j for j in range(a.mbs)]
                samples = [ds[i] for i in idx]
                mbs.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
        res = step(mbs, consumed)
        assert not res.skipped
        losses.append(res.losses)
        grad_norms.append(res.grad_norm)
    params = {}
    with params_synced(ddp):  # with --overlap the last step's all-gather is still pending
        for c in chunks:
            params.update(gather_full_state_dict(c))
    torch.save({"losses": losses, "grad_norms": grad_norms, "params": params, "params0": params0, "sent": sent,
                "buckets": sum(len(g.buckets) for m in ddp for g in m.bucket_groups),
                "param_gather_pre_hooks": all(m.use_forward_hook for m in ddp),
                "tp_rank": ps.get_tensor_model_parallel_rank()},
               os.path.join(a.out, f"rank{info.rank}.pt"))


if __name__ == "__main__":
    main()
