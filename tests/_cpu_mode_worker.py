"""Worker for tests/test_cpu_mode.py, launched with torchrun (gloo, CPU).

Trains a toy pipeline model built from megatron-core ColumnParallelLinear/RowParallelLinear
through the real megatron-core paths (get_forward_backward_func, DistributedDataParallel,
get_megatron_optimizer, finalize_model_grads, dist_checkpointing) and compares every rank's
losses and parameter shards with a plain-torch single-process reference of the same math.

    torchrun --standalone --nproc-per-node 2 tests/_cpu_mode_worker.py [--cases pp2 tp2 dp2] \
        [--ckpt-dir DIR]

Cases (all on 2 ranks): pp2 = PP 2 (uneven 2|1 split, 1F1B, 4 micro-batches); tp2 = TP 2;
dp2 = DP 2 with the distributed optimizer and overlap_grad_reduce. Prints "[case] rank R:
CASE_OK" per case and "CPU_MODE_WORKER_OK rank=R" at the end; any mismatch raises.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()
from functools import partial

import torch
import torch.nn.functional as F

# The worker is run as a script; make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IN_DIM, HIDDEN, FFN, OUT_DIM, SEQ = 6, 16, 32, 6, 4  # all TP-divisible
NUM_LAYERS, FIRST_STAGE_LAYERS = 3, 2  # uneven split on PP=2: [2 | 1]
GLOBAL_BATCH, MICRO_BATCH = 8, 2
LR, CLIP = 1e-2, 0.05  # small clip so clipping really runs
STEPS = 3
INIT_STD = 0.3


def init_method(w):
    return torch.nn.init.normal_(w, mean=0.0, std=INIT_STD)


def layer_seed(seed: int, key: int) -> int:
    """Layout-independent init: one seed per (seed, global module index)."""
    return seed * 1000 + 17 + key


def sample(step: int, i: int):
    """Per-sample data, keyed by (step, sample index): the same on every layout."""
    g = torch.Generator().manual_seed(100_000 * step + i)
    return torch.randn(SEQ, IN_DIM, generator=g), torch.randn(SEQ, OUT_DIM, generator=g)


# ------------------------------------------------------------------ plain torch reference
def reference_params(seed: int):
    """Master weights of the whole model, in the order/shapes megatron creates them."""
    p = {}
    torch.manual_seed(layer_seed(seed, -1))
    p["embed.w"] = init_method(torch.empty(HIDDEN, IN_DIM))
    p["embed.b"] = torch.zeros(HIDDEN)
    for layer in range(NUM_LAYERS):
        torch.manual_seed(layer_seed(seed, layer))
        p[f"blocks.{layer}.fc1.w"] = init_method(torch.empty(FFN, HIDDEN))
        p[f"blocks.{layer}.fc1.b"] = torch.zeros(FFN)
        p[f"blocks.{layer}.fc2.w"] = init_method(torch.empty(HIDDEN, FFN))
        p[f"blocks.{layer}.fc2.b"] = torch.zeros(HIDDEN)
    torch.manual_seed(layer_seed(seed, NUM_LAYERS))
    p["head.w"] = init_method(torch.empty(OUT_DIM, HIDDEN))
    p["head.b"] = torch.zeros(OUT_DIM)
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


def reference_forward(p, x):
    h = x @ p["embed.w"].T + p["embed.b"]
    for layer in range(NUM_LAYERS):
        a = F.gelu(h @ p[f"blocks.{layer}.fc1.w"].T + p[f"blocks.{layer}.fc1.b"])
        h = h + a @ p[f"blocks.{layer}.fc2.w"].T + p[f"blocks.{layer}.fc2.b"]
    return h @ p["head.w"].T + p["head.b"]


def reference_train(seed: int, steps: int):
    """Plain single-process training; returns the losses and the params after every step."""
    p = reference_params(seed)
    opt = torch.optim.AdamW(list(p.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    losses, snapshots = [], []
    for step in range(steps):
        xs, ts = zip(*(sample(step, i) for i in range(GLOBAL_BATCH)))
        y = reference_forward(p, torch.stack(xs, 1))
        t = torch.stack(ts, 1)
        loss = ((y - t) ** 2).sum() / t.numel()  # per-element mean over the global batch
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), CLIP)
        opt.step()
        losses.append(loss.item())
        snapshots.append({k: v.detach().clone() for k, v in p.items()})
    return losses, snapshots


# ------------------------------------------------------------------ megatron toy model
def build_model(seed: int, tp: int, pp: int, bf16: bool = False, vpp=None):
    """Return (config, [model chunk per virtual stage on this rank])."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.enums import ModelType
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM's default for the interleaved schedule (--overlap-p2p-communication):
        # unbatched isend/irecv, which with PP=2 puts the two directions on two process groups.
        # Batched p2p with PP=2 lets send_prev and send_next to the same peer cross (activation
        # and gradient of equal shapes swap silently) - seen here on gloo.
        overlap_p2p_comm=bool(vpp),
        batch_p2p_comm=not vpp,
        pipeline_dtype=dtype,  # dtype of the p2p messages
        params_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=True,  # full master weight, split over TP: TP-layout independent
        perform_initialization=True,
        gradient_accumulation_fusion=False,  # the fused wgrad kernel is CUDA/apex only
        calculate_per_token_loss=True,  # 3-tuple loss, grads scaled by global token count
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
    )

    class Block(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_method,
                                            bias=True, gather_output=False)
            self.fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init_method,
                                         bias=True, input_is_parallel=True,
                                         skip_bias_add=False)

        def forward(self, h):
            a, _ = self.fc1(h)
            out, _ = self.fc2(F.gelu(a))
            return h + out

    class ToyStage(MegatronModule):
        def __init__(self, pre_process, post_process, first_layer, num_local, vp_stage=None):
            super().__init__(config)
            self.vp_stage = vp_stage  # the interleaved schedule checks it
            self.model_type = ModelType.encoder_or_decoder  # the schedules read it
            # finalize_model_grads all-reduces tied embedding/output weights of the first and
            # last stage when this is True (GPT-style tying); the toy (like sd3) ties nothing.
            self.share_embeddings_and_output_weights = False
            self.pre_process, self.post_process = pre_process, post_process
            self.first_layer = first_layer
            self.input_tensor = None
            if pre_process:
                torch.manual_seed(layer_seed(seed, -1))
                self.embed = ColumnParallelLinear(IN_DIM, HIDDEN, config=config,
                                                  init_method=init_method, bias=True,
                                                  gather_output=True)
            blocks = []
            for layer in range(first_layer, first_layer + num_local):
                torch.manual_seed(layer_seed(seed, layer))
                blocks.append(Block())
            self.blocks = torch.nn.ModuleList(blocks)
            if post_process:
                torch.manual_seed(layer_seed(seed, NUM_LAYERS))
                self.head = ColumnParallelLinear(HIDDEN, OUT_DIM, config=config,
                                                 init_method=init_method, bias=True,
                                                 gather_output=True)

        def set_input_tensor(self, input_tensor):
            if isinstance(input_tensor, list):
                input_tensor = input_tensor[0]
            self.input_tensor = input_tensor

        def forward(self, x):
            # (what megatron's Float16Module does: bf16 in on the first stage, fp32 out on the last)
            h = self.embed(x.to(dtype))[0] if self.pre_process else self.input_tensor
            for block in self.blocks:
                h = block(h)
            return self.head(h)[0].float() if self.post_process else h

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            # Blocks are keyed by their *global* index so that checkpoints are layout-independent.
            # Like MegatronModule.sharded_state_dict: the TP layers need metadata["dp_cp_group"].
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sd = {}
            for name in ("embed", "head"):
                if hasattr(self, name):
                    sd.update(getattr(self, name).sharded_state_dict(
                        prefix=f"{prefix}{name}.", sharded_offsets=sharded_offsets,
                        metadata=metadata))
            for i, block in enumerate(self.blocks):
                # dict keys stay local (load_state_dict wants them), checkpoint keys are global
                # (what megatron's TransformerBlock does for non-homogeneous layers)
                local = f"{prefix}blocks.{i}."
                block_sd = block.sharded_state_dict(prefix=local, sharded_offsets=sharded_offsets,
                                                    metadata=metadata)
                replace_prefix_for_sharding(block_sd, local,
                                            f"{prefix}blocks.{self.first_layer + i}.")
                sd.update(block_sd)
            return sd

    pp_rank = ps.get_pipeline_model_parallel_rank()
    if vpp:
        # virtual stage v*pp + pp_rank; layers spread in order, the last stages may hold none
        n_stages = pp * vpp
        split = [NUM_LAYERS // n_stages + (1 if i < NUM_LAYERS % n_stages else 0)
                 for i in range(n_stages)]
        chunks = []
        for v in range(vpp):
            stage = v * pp + pp_rank
            chunks.append(ToyStage(stage == 0, stage == n_stages - 1, sum(split[:stage]),
                                   split[stage], vp_stage=v))
        return config, chunks
    if pp == 1:
        first, num = 0, NUM_LAYERS
    else:
        assert pp == 2
        first, num = (0, FIRST_STAGE_LAYERS) if pp_rank == 0 else (
            FIRST_STAGE_LAYERS, NUM_LAYERS - FIRST_STAGE_LAYERS)
    return config, [ToyStage(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), first,
                             num)]


def local_param_names(model):
    """Map megatron param names of this rank to reference names."""
    names = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            ref = f"blocks.{model.first_layer + int(parts[1])}.{parts[2]}.{parts[3][0]}"
        else:
            ref = f"{parts[0]}.{parts[1][0]}"
        names[name] = ref
    return names


def shard_of(full, param):
    """The TP shard of a full reference tensor that `param` holds on this rank."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    tp_rank = ps.get_tensor_model_parallel_rank()
    size = param.shape[dim]
    return full.narrow(dim, tp_rank * size, size)


def build_training(args, seed):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config, chunks = build_model(seed, args.tp, args.pp, args.bf16, args.vpp)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    # One DDP per model chunk; Megatron-LM disables bucketing for all chunks but the first.
    ddp_chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                          disable_bucketing=i > 0)
                  for i, chunk in enumerate(chunks)]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_eps=1e-8, clip_grad=CLIP, use_distributed_optimizer=args.distributed_optimizer,
        bf16=args.bf16, fp16=False, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    # How megatron's training loop wires the pieces into the schedule:
    no_sync = [m.no_sync for m in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:
        grad_sync = [m.start_grad_sync for m in ddp_chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return config, chunks, ddp_chunks, optimizer


def train_step(step, config, ddp_chunks, optimizer):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    n_micro = per_rank // MICRO_BATCH

    def microbatches():
        for m in range(n_micro):
            idx = [dp_rank * per_rank + m * MICRO_BATCH + j for j in range(MICRO_BATCH)]
            xs, ts = zip(*(sample(step, i) for i in idx))
            yield torch.stack(xs, 1), torch.stack(ts, 1)  # [seq, micro_batch, dim]

    def loss_func(target, output):
        sq = ((output - target) ** 2).sum()
        count = torch.tensor(target.numel(), dtype=torch.int)
        return sq, count, {"loss": torch.stack([sq.detach(), count.float()])}

    def forward_step(data_iterator, model):
        x, t = next(data_iterator)
        return model(x), partial(loss_func, t)

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [microbatches() for _ in ddp_chunks]  # interleaved: one per chunk
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators[0] if len(iterators) == 1 else iterators,
        model=ddp_chunks,
        num_microbatches=n_micro,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    loss = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        tot = torch.stack([d["loss"] for d in out]).sum(0)
        torch.distributed.all_reduce(tot, group=ps.get_data_parallel_group())
        loss = (tot[0] / tot[1]).item()
    return loss, grad_norm


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


def chunk_keys(chunks):
    """Megatron-LM's checkpoint keys: "model", or "model0", "model1", ... with VPP chunks."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_state_dicts(chunks, metadata):
    # Each chunk adds metadata["dp_cp_group"] (a process group): give it a copy, and keep the
    # plain dict for content_metadata (stored in the checkpoint).
    return {key: chunk.sharded_state_dict(metadata=dict(metadata))
            for key, chunk in zip(chunk_keys(chunks), chunks)}


def check_close(name, got, want, rtol=1e-5):
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if not diff <= rtol * max(scale, 1e-6):
        raise AssertionError(f"{name}: max abs diff {diff:.3e} vs scale {scale:.3e}")
    return diff / max(scale, 1e-12)


def compare_params(tag, chunks, ref, rtol=1e-5):
    worst = 0.0
    for chunk in chunks:
        names = local_param_names(chunk)
        for name, param in chunk.named_parameters():
            worst = max(worst, check_close(f"{tag} {name}", param.detach().float(),
                                           shard_of(ref[names[name]], param), rtol))
    return worst


CASES = {
    # name: (tp, pp, distributed optimizer, overlap_grad_reduce)
    "pp2": dict(tp=1, pp=2, distributed_optimizer=False, overlap_grad_reduce=False),
    "tp2": dict(tp=2, pp=1, distributed_optimizer=False, overlap_grad_reduce=False),
    # + Megatron-LM's default fully-parallel save (each DP rank writes a share of the replicas)
    "dp2": dict(tp=1, pp=1, distributed_optimizer=True, overlap_grad_reduce=True,
                fully_parallel_save=True),
    # bf16 params, fp32 main params: Float16OptimizerWithFloat16Params / DistributedOptimizer
    "pp2_bf16": dict(tp=1, pp=2, distributed_optimizer=False, overlap_grad_reduce=False,
                     bf16=True),
    "dp2_bf16": dict(tp=1, pp=1, distributed_optimizer=True, overlap_grad_reduce=True,
                     bf16=True),
    # interleaved 1F1B: PP 2 x VPP 2, layers [1, 1 | 1, 0] over virtual stages, 2 chunks/rank
    "vpp2": dict(tp=1, pp=2, vpp=2, distributed_optimizer=False, overlap_grad_reduce=False),
    # whatever the world is, all data parallel (world 1: a true single process)
    "plain": dict(tp=1, pp=1, distributed_optimizer=False, overlap_grad_reduce=False),
}


def run_case(name, args):
    from megatron.core import dist_checkpointing

    from megatron_sd3.testing import cpu_mode
    from megatron_sd3.distributed import initialize_distributed

    t_case = time.perf_counter()
    info = initialize_distributed(tp=args.tp, pp=args.pp, vpp=args.vpp, seed=1234)
    assert info.cpu_mode and info.backend == "gloo" and cpu_mode.is_cpu_mode_enabled()
    rank = info.rank
    check_rng_tracker(seed=1234, tp_rank=info.tp_rank)
    tag = f"[{name}] rank {rank}"

    seed = 7
    # bf16 is a smoke test of the mixed-precision paths: bf16 rounding can flip the sign of a
    # tiny Adam update (each worth ~lr), so params only track the fp32 reference to a few %
    tol = 5e-2 if args.bf16 else 1e-5
    config, model, ddp_model, optimizer = build_training(args, seed)  # model: list of chunks
    ref_losses, ref_snapshots = reference_train(seed, STEPS + 1)
    ref_params_n, ref_params_n1 = ref_snapshots[STEPS - 1], ref_snapshots[STEPS]

    worst_loss = 0.0
    for step in range(STEPS):
        loss, _ = train_step(step, config, ddp_model, optimizer)
        if loss is not None:
            rel = abs(loss - ref_losses[step]) / abs(ref_losses[step])
            worst_loss = max(worst_loss, rel)
            assert rel <= tol, f"step {step}: loss {loss} vs reference {ref_losses[step]}"
    worst_param = compare_params("after training", model, ref_params_n, tol)
    report(f"{tag}: {STEPS} steps match the single-process reference "
          f"(loss rel diff {worst_loss:.2e}, param rel diff {worst_param:.2e}) "
          f"[{time.perf_counter() - t_case:.1f}s]")

    if args.ckpt_dir:
        ckpt_dir = os.path.join(args.ckpt_dir, name)
        metadata = {"distrib_optim_sharding_type": args.sharding_type,
                    "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        state = model_state_dicts(model, metadata)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
        if rank == 0:  # save() wants an existing (empty) directory
            os.makedirs(ckpt_dir, exist_ok=True)
        torch.distributed.barrier()
        save_strategy = None
        if args.fully_parallel_save:  # Megatron-LM's default (--ckpt-fully-parallel-save)
            from megatron.core import parallel_state as ps
            from megatron.core.dist_checkpointing.serialization import (
                get_default_save_sharded_strategy,
            )
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )

            save_strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(),
                ps.get_data_parallel_group(with_context_parallel=True))
        dist_checkpointing.save(state, ckpt_dir, sharded_strategy=save_strategy,
                                content_metadata=metadata)
        torch.distributed.barrier()

        # A fresh model/optimizer with other weights, then load.
        config2, model2, ddp2, opt2 = build_training(args, seed + 1)
        load_sd = model_state_dicts(model2, metadata)
        load_sd["optimizer"] = opt2.sharded_state_dict(load_sd, is_loading=True,
                                                       metadata=metadata)
        load_strategy = None
        if args.fully_parallel_load:
            from megatron.core import parallel_state as ps
            from megatron.core.dist_checkpointing.serialization import (
                get_default_load_sharded_strategy,
            )
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelLoadStrategyWrapper,
            )

            load_strategy = FullyParallelLoadStrategyWrapper(
                get_default_load_sharded_strategy(ckpt_dir),
                ps.get_data_parallel_group(with_context_parallel=True))
        loaded = dist_checkpointing.load(load_sd, ckpt_dir, sharded_strategy=load_strategy)
        for key, chunk in zip(chunk_keys(model2), model2):
            chunk.load_state_dict(loaded[key])
        # no_grad: with fp32 params the distributed optimizer's main params are views of the
        # (requires_grad) model params, and its load copies into them in place.
        with torch.no_grad():
            opt2.load_state_dict(loaded["optimizer"])
        compare_params("after load", model2, ref_params_n, tol)
        # One more step from the loaded state must equal step STEPS+1 of the reference
        # (needs Adam moments and step count restored, not just weights).
        loss, _ = train_step(STEPS, config2, ddp2, opt2)
        if loss is not None:
            rel = abs(loss - ref_losses[STEPS]) / abs(ref_losses[STEPS])
            assert rel <= tol, f"resumed loss {loss} vs reference {ref_losses[STEPS]}"
        worst = compare_params("resumed step", model2, ref_params_n1, tol)
        # And bit-identical to the original model continuing without the save/load.
        loss_orig, _ = train_step(STEPS, config, ddp_model, optimizer)
        assert loss == loss_orig, f"resumed loss {loss} != uninterrupted loss {loss_orig}"
        for c1, c2 in zip(model, model2):
            for (n1, p1), (n2, p2) in zip(c1.named_parameters(), c2.named_parameters()):
                assert n1 == n2 and torch.equal(p1, p2), f"resumed {n2} differs"
        report(f"{tag}: checkpoint save/load round-trips; resumed step matches the reference "
               f"and is bit-identical to the uninterrupted run "
              f"(param rel diff {worst:.2e}) [{time.perf_counter() - t_case:.1f}s]")
    report(f"{tag}: CASE_OK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--ckpt-dir", default=None, help="root folder; one checkpoint per case")
    ap.add_argument("--sharding-type", default="dp_reshardable")
    ap.add_argument("--fully-parallel-save", action="store_true")
    ap.add_argument("--fully-parallel-load", action="store_true")
    ap.add_argument("--report-dir", default=None, help="write report_rank<R>.txt here")
    args = ap.parse_args()
    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        _REPORT["path"] = os.path.join(args.report_dir, f"report_rank{rank}.txt")

    from megatron_sd3.distributed import destroy_distributed

    for name in args.cases:  # one process group; parallel_state is rebuilt per case
        opts = {**vars(args), "bf16": False, "vpp": None, "fully_parallel_save": False,
                **CASES[name]}
        opts["fully_parallel_save"] = args.fully_parallel_save or opts["fully_parallel_save"]
        run_case(name, argparse.Namespace(**opts))
    rank = torch.distributed.get_rank()
    destroy_distributed()
    report(f"CPU_MODE_WORKER_OK rank={rank} [total {time.perf_counter() - T0:.1f}s]")


if __name__ == "__main__":  # required: dist_checkpointing's async writer spawns a manager
    main()
