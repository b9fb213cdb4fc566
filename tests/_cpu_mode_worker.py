"""Worker for tests/multiprocess/test_cpu_mode.py: the real SD3Model (tiny preset) through the production wiring
(``megatron_sd3.training.build.build_training`` and ``training.step.TrainStep``)
on CPU (gloo, ``megatron_sd3.testing.cpu_mode``), then a dist_checkpointing save/load/resume.

    python tests/_cpu_mode_worker.py --cases plain --save-reference REF.pt ...      # 1 process
    torchrun --standalone --nproc-per-node 2 tests/_cpu_mode_worker.py --reference REF.pt \
        [--cases pp2 vpp2 tp2 dp2 pp2_bf16 dp2_bf16] [--ckpt-dir DIR] [--report-dir DIR]

The single-process ``plain`` run is the reference: it writes its losses and full parameters
after every step. Every 2-rank case (pp2 = PP 2 with an uneven 3|1 split, 1F1B over 4
micro-batches; vpp2 = PP 2 x VPP 2, interleaved; tp2 = TP 2; dp2 = DP 2 with the distributed
optimizer, overlap_grad_reduce and a fully-parallel save; *_bf16 = bf16 params with fp32 main
params) trains the same steps and matches it, then saves, loads into a model built from another
seed, resumes one step (matches the reference) bit-identically to the uninterrupted run.
Prints "[case] rank R: CASE_OK" per case and "CPU_MODE_WORKER_OK rank=R" at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _bounds import ADAM_EPS, BOUND, LR  # noqa: E402

NUM_LAYERS, GBS, MBS, STEPS, SEED = 4, 8, 2, 3, 42
CLIP = 0.5  # below the gradient norm (about 0.8), so clipping really runs

CASES = {
    # name: layout and optimizer options
    "plain": dict(tp=1, pp=1),  # whatever the world is, all data parallel
    "pp2": dict(tp=1, pp=2, pipeline_layers=[3, 1]),
    # interleaved 1F1B: PP 2 x VPP 2, one block per virtual stage, 2 chunks/rank
    "vpp2": dict(tp=1, pp=2, vpp=2),
    "tp2": dict(tp=2, pp=1),
    # + Megatron-LM's default fully-parallel save (each DP rank writes a share of the replicas)
    "dp2": dict(tp=1, pp=1, distributed_optimizer=True, overlap_grad_reduce=True,
                fully_parallel_save=True),
    # bf16 params, fp32 main params: Float16OptimizerWithFloat16Params / DistributedOptimizer
    "pp2_bf16": dict(tp=1, pp=2, pipeline_layers=[3, 1], bf16=True),
    "dp2_bf16": dict(tp=1, pp=1, distributed_optimizer=True, overlap_grad_reduce=True, bf16=True),
}

_REPORT = {"path": None}


def report(line):
    """Print, and append to this rank's report file (ranks' stdout interleaves)."""
    print(line, flush=True)
    if _REPORT["path"]:
        with open(_REPORT["path"], "a") as f:
            f.write(line + "\n")


def check_rng_tracker(seed, tp_rank):
    """CPU seeding equals megatron's model_parallel_cuda_manual_seed arithmetic."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    def draws(s):
        return torch.rand(4, generator=torch.Generator().manual_seed(s))

    state = torch.get_rng_state()
    assert torch.equal(torch.rand(4), draws(seed)), "default generator is not seeded with seed"
    with get_cuda_rng_tracker().fork():  # tensor-parallel region: seed + 2718 + tp_rank
        inside = torch.rand(4)
    assert torch.equal(inside, draws(seed + 2718 + tp_rank)), "TP RNG stream differs"
    with get_cuda_rng_tracker().fork():  # the tracker advanced its own stream
        again = torch.rand(4)
    assert torch.equal(again, torch.rand(8, generator=torch.Generator().manual_seed(
        seed + 2718 + tp_rank))[4:]), "TP RNG stream did not advance"
    torch.set_rng_state(state)


def build_layout(opts, init_seed):
    """The production wiring for one layout: (chunks, ddp chunks, optimizer, TrainStep)."""
    from megatron_sd3.config import make_config
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    parallel = dict(tensor_model_parallel_size=opts.tp, pipeline_model_parallel_size=opts.pp,
                    **pipeline_config_fields(NUM_LAYERS, opts.pp, opts.pipeline_layers))
    if opts.vpp:
        # Megatron-LM's default for the interleaved schedule: unbatched isend/irecv.
        parallel.update(virtual_pipeline_model_parallel_size=opts.vpp, overlap_p2p_comm=True,
                        batch_p2p_comm=False)
    if opts.bf16:
        parallel.update(bf16=True, params_dtype=dtype, pipeline_dtype=dtype)
    cfg = make_config("tiny", num_layers=NUM_LAYERS, zero_init_adaln=False, init_seed=init_seed,
                      parallel=parallel)
    built = build_training(cfg, optimizer=dict(lr=LR, adam_eps=ADAM_EPS, weight_decay=0.01, clip_grad=CLIP),
                           use_distributed_optimizer=opts.distributed_optimizer,
                           overlap_grad_reduce=opts.overlap_grad_reduce)
    chunks, ddp, opt = built.chunks, built.ddp, built.optimizer
    step = TrainStep(cfg, ddp, opt, global_batch_size=GBS, micro_batch_size=MBS, seed=SEED)
    return chunks, ddp, opt, step


def microbatches(step, it):
    from megatron.core import parallel_state as ps

    from megatron_sd3.data.mock import MockDataset

    if not (step.first or step.last):
        return None
    ds = MockDataset(1000, latent_size=(8, 6), in_channels=16, text_len=16, text_dim=32,
                     pooled_dim=32, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank, consumed = GBS // dp, it * GBS
    out = []
    for m in range(per_rank // MBS):
        samples = [ds[consumed + dp_rank * per_rank + m * MBS + j] for j in range(MBS)]
        out.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
    return out


def train(step, it):
    res = step(microbatches(step, it), it * GBS)
    assert not res.skipped, f"step {it} skipped"
    assert it > 0 or res.grad_norm > CLIP, f"grad norm {res.grad_norm} <= --clip-grad {CLIP}: nothing clipped"
    return res.losses["loss"]


def full_params(chunks):
    from megatron_sd3.convert import gather_full_state_dict
    from megatron_sd3.training.build import unwrap

    out = {}
    for c in chunks:
        out.update({k: v.float() for k, v in gather_full_state_dict(unwrap(c)).items()})
    return out


def compare_params(tag, params, ref, tol, start):
    """Every parameter this rank holds vs the reference's. fp32: each tensor's update since
    ``start`` (the reference's initial weights, the same at any layout) against the reference's
    update, within the fp32 bound (tests/_bounds.py). bf16: the parameters, all of them at once
    (bf16 rounding of the weights themselves is larger than an update)."""
    from megatron_sd3.testing.helpers import rel

    assert params and set(params) <= set(ref), f"{tag}: names differ from the reference"
    if tol > BOUND:
        worst = rel(torch.cat([params[k].flatten() for k in params]),
                    torch.cat([ref[k].flatten() for k in params]))
    else:
        worst = max(rel(params[k] - start[k], ref[k] - start[k]) for k in params)
    assert worst <= tol, f"{tag}: param rel diff {worst:.3e} > {tol}"
    return worst


def chunk_keys(chunks):
    """Megatron-LM's checkpoint keys: "model", or "model0", "model1", ... with VPP chunks."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_state(chunks, opt, metadata, is_loading):
    # Each chunk adds metadata["dp_cp_group"] (a process group): give it a copy, and keep the
    # plain dict for content_metadata (stored in the checkpoint).
    state = {key: c.sharded_state_dict(metadata=dict(metadata))
             for key, c in zip(chunk_keys(chunks), chunks)}
    models = state["model"] if len(chunks) == 1 else dict(state)
    state["optimizer"] = opt.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)
    return state


def fully_parallel(wrapper_name, strategy):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies import fully_parallel as fp

    return getattr(fp, wrapper_name)(strategy, ps.get_data_parallel_group(with_context_parallel=True))


def checkpoint_round_trip(name, opts, chunks, step, ref, tol, tag, t_case):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )

    ckpt_dir = os.path.join(opts.ckpt_dir, name)
    metadata = {"distrib_optim_sharding_type": opts.sharding_type,
                "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if torch.distributed.get_rank() == 0:  # save() wants an existing (empty) directory
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    save_strategy = None
    if opts.fully_parallel_save:  # Megatron-LM's default (--ckpt-fully-parallel-save)
        save_strategy = fully_parallel("FullyParallelSaveStrategyWrapper",
                                       get_default_save_sharded_strategy())
    dist_checkpointing.save(sharded_state(chunks, step.optimizer, metadata, False), ckpt_dir,
                            sharded_strategy=save_strategy, content_metadata=metadata)
    torch.distributed.barrier()

    # A fresh model/optimizer with other weights, then load.
    chunks2, _, opt2, step2 = build_layout(opts, init_seed=SEED + 1)
    load_strategy = None
    if opts.fully_parallel_load:
        load_strategy = fully_parallel("FullyParallelLoadStrategyWrapper",
                                       get_default_load_sharded_strategy(ckpt_dir))
    loaded = dist_checkpointing.load(sharded_state(chunks2, opt2, metadata, True), ckpt_dir,
                                     sharded_strategy=load_strategy)
    for key, c in zip(chunk_keys(chunks2), chunks2):
        c.load_state_dict(loaded[key])
    # no_grad: with fp32 params the distributed optimizer's main params are views of the
    # (requires_grad) model params, and its load copies into them in place.
    with torch.no_grad():
        opt2.load_state_dict(loaded["optimizer"])
    compare_params(f"{tag} after load", full_params(chunks2), ref["params"][STEPS - 1], tol, ref["params0"])
    # One more step from the loaded state must equal step STEPS+1 of the reference (needs Adam
    # moments and step count restored, not just weights) ...
    loss = train(step2, STEPS)
    assert abs(loss - ref["losses"][STEPS]) <= tol * abs(ref["losses"][STEPS]), \
        f"resumed loss {loss} vs reference {ref['losses'][STEPS]}"
    worst = compare_params(f"{tag} resumed step", full_params(chunks2), ref["params"][STEPS], tol, ref["params0"])
    # ... and bit-identical to the original model continuing without the save/load.
    loss_orig = train(step, STEPS)
    assert loss == loss_orig, f"resumed loss {loss} != uninterrupted loss {loss_orig}"
    for c1, c2 in zip(chunks, chunks2):
        for (n1, p1), (n2, p2) in zip(c1.named_parameters(), c2.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2), f"resumed {n2} differs"
    report(f"{tag}: checkpoint save/load round-trips; resumed step matches the reference "
           f"and is bit-identical to the uninterrupted run "
           f"(param rel diff {worst:.2e}) [{time.perf_counter() - t_case:.1f}s]")


def run_case(name, opts):
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.testing import cpu_mode

    t_case = time.perf_counter()
    info = initialize_distributed(tp=opts.tp, pp=opts.pp, vpp=opts.vpp, seed=1234)
    assert info.cpu_mode and info.backend == "gloo" and cpu_mode.is_cpu_mode_enabled()
    check_rng_tracker(seed=1234, tp_rank=info.tp_rank)
    tag = f"[{name}] rank {info.rank}"
    chunks, _, _, step = build_layout(opts, init_seed=SEED)

    if opts.save_reference:  # the single-process reference: STEPS + 1 steps, params after each
        assert info.world_size == 1, "the reference is a single-process run"
        losses, params, params0 = [], [], full_params(chunks)
        for it in range(STEPS + 1):
            losses.append(train(step, it))
            params.append(full_params(chunks))
        torch.save({"losses": losses, "params": params, "params0": params0}, opts.save_reference)
        report(f"{tag}: reference of {STEPS + 1} steps written")
        # ... and the same checks as any layout, against it (the same process: exact)
        chunks, _, _, step = build_layout(opts, init_seed=SEED)
    ref = torch.load(opts.reference or opts.save_reference)
    # bf16 is a smoke test of the mixed-precision paths: params track the fp32 reference to ~%
    tol = 5e-2 if opts.bf16 else BOUND
    worst_loss = 0.0
    for it in range(STEPS):
        loss = train(step, it)
        worst_loss = max(worst_loss, abs(loss - ref["losses"][it]) / abs(ref["losses"][it]))
        assert worst_loss <= tol, f"step {it}: loss {loss} vs reference {ref['losses'][it]}"
    worst_param = compare_params(f"{tag} after training", full_params(chunks),
                                 ref["params"][STEPS - 1], tol, ref["params0"])
    report(f"{tag}: {STEPS} steps match the single-process reference "
           f"(loss rel diff {worst_loss:.2e}, param rel diff {worst_param:.2e}) "
           f"[{time.perf_counter() - t_case:.1f}s]")
    if opts.ckpt_dir:
        checkpoint_round_trip(name, opts, chunks, step, ref, tol, tag, t_case)
    report(f"{tag}: CASE_OK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(set(CASES) - {"plain"}))
    ap.add_argument("--reference", default=None, help="the reference written by --save-reference")
    ap.add_argument("--save-reference", default=None, help="write the reference here (plain, 1 process)")
    ap.add_argument("--ckpt-dir", default=None, help="root folder; one checkpoint per case")
    ap.add_argument("--sharding-type", default="dp_reshardable")
    ap.add_argument("--fully-parallel-save", action="store_true")
    ap.add_argument("--fully-parallel-load", action="store_true")
    ap.add_argument("--report-dir", default=None, help="write report_rank<R>.txt here")
    args = ap.parse_args()
    if not (args.reference or args.save_reference):
        ap.error("give --reference REF.pt (or --save-reference REF.pt with --cases plain)")
    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        _REPORT["path"] = os.path.join(args.report_dir, f"report_rank{os.environ.get('RANK', '0')}.txt")

    from megatron_sd3.distributed import destroy_distributed

    defaults = dict(vpp=None, pipeline_layers=None, bf16=False, distributed_optimizer=False,
                    overlap_grad_reduce=False, fully_parallel_save=False)
    for name in args.cases:  # one process group; parallel_state is rebuilt per case
        opts = {**vars(args), **defaults, **CASES[name]}
        opts["fully_parallel_save"] = args.fully_parallel_save or opts["fully_parallel_save"]
        run_case(name, argparse.Namespace(**opts))
    rank = torch.distributed.get_rank()
    destroy_distributed()
    report(f"CPU_MODE_WORKER_OK rank={rank} [total {time.perf_counter() - T0:.1f}s]")


if __name__ == "__main__":  # required: dist_checkpointing's async writer spawns a manager
    main()
