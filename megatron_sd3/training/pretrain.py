"""The pretraining loop behind ``pretrain_sd3.py`` (Megatron-LM's ``pretrain`` in small).

setup (distributed, layout checks, config, model, DDP, optimizer, LR scheduler, EMA, data, resume)
-> for each iteration: the iteration's microbatches -> ``TrainStep`` -> EMA -> log -> save / exit
checks (interval, SIGTERM with ``--exit-signal-handler``, ``--exit-duration-in-mins``)
-> final summary.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.enums import AttnBackend

from megatron_sd3.arguments import effective_config, flow_config, mock_latent_hw, optional_kernels
from megatron_sd3.config import ConfigError, config_to_dict, make_config, model_fields
from megatron_sd3.distributed import initialize_distributed
from megatron_sd3.flops import model_flops_per_sample
from megatron_sd3.loss import loss_terms
from megatron_sd3.memory import report_at_start
from megatron_sd3.training import checkpointing as ckpt
from megatron_sd3.training.fault_tolerance import FaultTolerance
from megatron_sd3.training.build import build_training, device, params_synced, use_fused_torch_adam
from megatron_sd3.training.metrics import MetricsError, MetricsWriter, WandbSettings, check_wandb
from megatron_sd3.training.output_paths import check_output_paths
from megatron_sd3.training.parallel_layout import LayoutError, check_layout, pipeline_config_fields, stage_layers
from megatron_sd3.training.step import TrainStep


class SignalHandler:
    """SIGTERM (SLURM preemption, scancel) sets a flag; all ranks agree at the iteration's end."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        t = torch.tensor([1.0 if self.received else 0.0], device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def _print0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def build_dataset(args, cfg, blend=None):
    """The training data (``blend`` None: ``--data-path`` or the mock source), or the parts of
    ``blend`` (``[(weight, dir)]``): one directory as is, several as a ``BlendedDataset``."""
    if blend is None and args.mock_data:
        from megatron_sd3.data.mock import MockDataset

        hw = mock_latent_hw(args, cfg.sample_size)
        return MockDataset(args.mock_num_samples, latent_size=hw, in_channels=cfg.in_channels,
                           text_len=cfg.text_seq_len, text_dim=cfg.joint_attention_dim,
                           pooled_dim=cfg.pooled_projection_dim, with_mask=args.mock_with_mask, seed=args.seed,
                           classes=args.mock_classes, task=args.mock_task)
    from megatron_sd3.data.blend import BlendedDataset
    from megatron_sd3.data.dataset import ShardedDataset

    blend = blend or args.data_blend
    parts = [ShardedDataset(p, verify="fast") for _, p in blend]
    if len(parts) == 1:
        return parts[0]
    return BlendedDataset(parts, [w for w, _ in blend], seed=args.seed, names=[p for _, p in blend])


def _check_data_matches_model(ds, cfg, args, path=None):
    """The dataset's text/pooled widths must be the model's (the text length too with pipeline
    stages; a single stage takes any): said before training starts. A blend: each of its parts."""
    parts = getattr(ds, "datasets", None)
    if parts is not None:
        for part, name in zip(parts, ds.names):
            _check_data_matches_model(part, cfg, args, path=name)
        return
    sample = ds[0]
    t, p, lat = sample["prompt_embeds"], sample["pooled_prompt_embeds"], sample["latents"]
    problems = []
    if t.shape[-1] != cfg.joint_attention_dim:
        problems.append(f"text width {t.shape[-1]} vs model joint_attention_dim {cfg.joint_attention_dim}")
    if cfg.pipeline_model_parallel_size > 1 and t.shape[0] != cfg.text_seq_len:
        problems.append(f"text length {t.shape[0]} vs model text_seq_len {cfg.text_seq_len} (pipeline stages "
                        f"exchange activations of the declared length)")
    if p.shape[-1] != cfg.pooled_projection_dim:
        problems.append(f"pooled width {p.shape[-1]} vs model {cfg.pooled_projection_dim}")
    if lat.shape[0] != cfg.in_channels:
        problems.append(f"latent channels {lat.shape[0]} vs model {cfg.in_channels}")
    if problems:
        raise ConfigError(f"data {path or (args.data_blend[0][1] if args.data_blend else 'mock')} does not fit the model: {'; '.join(problems)}; "
                          f"use a [model] preset matching the data (text_seq_len, joint_attention_dim, ...)")


def _check_buckets(args, model: dict, buckets) -> None:
    """Every latent bucket's image tokens split evenly over the ranks that split them (context
    parallel, and sequence parallel within each chunk): one line at start otherwise."""
    from types import SimpleNamespace

    from megatron_sd3.loss import ConfigView
    from megatron_sd3.models import context_parallel, sequence_parallel

    view = SimpleNamespace(tensor_model_parallel_size=args.tensor_model_parallel_size,
                           sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
                           patch_size=ConfigView(model).patch_size)  # a preset may leave it at the default
    p = view.patch_size
    for h, w in dict.fromkeys(buckets):
        n_img = (h // p) * (w // p)
        sequence_parallel.check_image_tokens(view, n_img)
        context_parallel.check_image_tokens(view, n_img)


def preflight(args):
    """Every check that needs no process group: model fields, parallel layout, pipeline split,
    FP8 backend, checkpoint to resume from, data manifest, the paths the run writes. Raises
    before any work starts."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    fields = dict(args.model)
    preset = fields.pop("preset", "tiny")
    mf = model_fields(preset, **fields)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.context_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * max(1, world // (tp * pp * cp))
    dp = check_layout(world, tp, pp, mf["num_layers"], mf["num_attention_heads"], mf["hidden_size"],
                      args.global_batch_size, args.micro_batch_size, cp=cp)
    layers = stage_layers(mf["num_layers"], pp, args.pipeline_layers)
    vpp = args.num_virtual_stages_per_pipeline_rank
    if vpp is not None:
        if vpp < 2 or pp < 2:
            raise LayoutError("--num-virtual-stages-per-pipeline-rank needs a value >= 2 and "
                              "--pipeline-model-parallel-size >= 2")
        if len(set(layers)) > 1 or layers[0] % vpp:
            raise LayoutError(f"interleaving needs the same number of blocks on every stage, divisible by "
                              f"{vpp} virtual stages; {mf['num_layers']} blocks on {pp} stages give {layers}")
        if (args.global_batch_size // (args.micro_batch_size * dp)) % pp:
            raise LayoutError(f"the interleaved schedule needs the number of microbatches per iteration to "
                              f"be a multiple of --pipeline-model-parallel-size {pp}")
    from megatron_sd3.backends import Fp8Settings, check_backend

    check_backend(args.transformer_impl, Fp8Settings(
        format=args.fp8_format, recipe=args.fp8_recipe,
        amax_history_len=args.fp8_amax_history_len) if args.fp8_format else None)
    if args.fp8_format:  # FP8 tensor cores: sm_89 and newer (on CPU torch's _scaled_mm kernel runs it)
        from megatron_sd3.env import fp8_device_problem, gpus

        problem = fp8_device_problem(gpus())
        if problem:
            raise ConfigError(problem)
    from megatron_sd3.training.build import check_compile_mode

    check_compile_mode(args.torch_compile_mode, torch_compile=args.torch_compile,
                       transformer_impl=args.transformer_impl)
    if args.attention_backend == "fused" and args.transformer_impl == "local" and not torch.cuda.is_available():
        raise ConfigError("--attention-backend fused is cuDNN attention and needs a CUDA GPU; "
                          "use auto, flash or unfused on CPU")
    data_sizes, buckets = [], []
    if args.data_path:  # a missing or damaged shard, or data of other widths: said before any work starts
        from megatron_sd3.data.shards import check_fits_model, verify
        from megatron_sd3.loss import ConfigView

        model = ConfigView(mf)  # the preset's fields over the SD3Config defaults
        for _, path in args.data_blend:  # each dataset of a blend
            manifest = verify(path, fast=True)
            check_fits_model(path, manifest, text_dim=model.joint_attention_dim,
                             pooled_dim=model.pooled_projection_dim, latent_channels=model.in_channels,
                             text_len=model.text_seq_len if pp > 1 else None)
            data_sizes.append(int(manifest["num_samples"]))
            buckets += [tuple(b) for b in manifest.get("latent_buckets") or []]
    if args.mock_data:
        buckets.append(mock_latent_hw(args, mf["sample_size"]))
    _check_buckets(args, mf, buckets)
    # -- validation, samples, W&B (training/evaluate.py, training/metrics.py) --
    if args.valid_data_path:
        from megatron_sd3.data.shards import load_manifest

        for _, path in args.valid_blend:
            _check_buckets(args, mf, [tuple(b) for b in load_manifest(path).get("latent_buckets") or []])
    if args.valid_samples and args.data_path:
        from megatron_sd3.data.blend import blend_counts

        n = sum(blend_counts(data_sizes, [w for w, _ in args.data_blend]))
        if args.valid_samples >= n:
            raise ConfigError(f"--valid-samples {args.valid_samples} leaves no training samples of the "
                              f"{n} in --data-path {' '.join(args.data_path)}; hold out fewer")
    if (args.sample_interval or args.clip_model) and vpp is not None:
        raise ConfigError("--sample-interval / --clip-model sample with one model chunk per rank; drop "
                          "--num-virtual-stages-per-pipeline-rank or them")
    if args.sample_prompts and not os.path.isfile(args.sample_prompts):
        raise ConfigError(f"--sample-prompts {args.sample_prompts}: file not found; write one with "
                          f"tools/preprocess_data.py --prompts prompts.txt")
    if args.clip_model:
        _clip_prompts(args)
        if not os.path.isfile(os.path.join(args.clip_model, "config.json")):
            raise ConfigError(f"--clip-model {args.clip_model}: no config.json there; give a local transformers "
                              f"CLIPModel folder (CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)")
    check_wandb(wandb_settings(args))
    check_output_paths(args)
    load_dir = ckpt.resolve_load(args.load, args.save, args.ckpt_step)
    data_blend = None
    if args.data_path:
        from megatron_sd3.data.blend import blend_signature, signature_problem

        data_blend = blend_signature(args.data_blend, data_sizes)
        if load_dir is not None:  # the blend keys the data order: a resume may not change it
            problem = signature_problem(ckpt.load_common(load_dir).get("data_blend"), data_blend)
            if problem:
                raise ckpt.CheckpointError(f"--load {load_dir}: {problem}")
    return {"preset": preset, "fields": fields, "model_fields": mf, "dp": dp, "load_dir": load_dir,
            "data_blend": data_blend}


def setup(args, plan):
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    preset, fields, mf, dp = plan["preset"], plan["fields"], plan["model_fields"], plan["dp"]
    vpp = args.num_virtual_stages_per_pipeline_rank
    info = initialize_distributed(tp, pp, vpp=vpp, seed=args.seed, timeout_minutes=args.distributed_timeout_minutes,
                                  cp=args.context_parallel_size)
    bf16 = bool(args.bf16 and torch.cuda.is_available())
    if args.bf16 and not bf16:
        _print0(" > --bf16 asked for without CUDA: this CPU run stays in fp32")
    parallel = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
                    **pipeline_config_fields(mf["num_layers"], pp, args.pipeline_layers))
    if vpp:  # interleaved 1F1B; batched p2p would mix up same-shaped messages (Megatron-LM's default)
        parallel.update(virtual_pipeline_model_parallel_size=vpp, overlap_p2p_comm=True, batch_p2p_comm=False)
    if bf16:
        parallel.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    if args.fp8_format:
        parallel.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_gemms=args.fp8_gemms,
                        fp8_amax_history_len=args.fp8_amax_history_len,
                        first_last_layers_bf16=args.first_last_layers_bf16)
    parallel["attention_backend"] = AttnBackend[args.attention_backend]
    if args.recompute_granularity:  # activation recomputation (megatron_sd3/recompute.py)
        parallel.update(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                        recompute_num_layers=args.recompute_num_layers, recompute_modules=args.recompute_modules)
    fields.update(init_seed=fields.get("init_seed", args.seed))
    cfg = make_config(preset, parallel=parallel, **fields)
    return info, cfg, dp


def scheduler_options(args) -> dict:
    """``OptimizerParamScheduler`` arguments from the run's flags (Megatron-LM's names)."""
    decay_iters = args.lr_decay_iters or args.train_iters
    wsd = args.lr_decay_style == "WSD"
    return dict(init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
                lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay_iters,
                lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
                wd_incr_steps=args.train_iters, wd_incr_style="constant",
                wsd_decay_steps=max(1, decay_iters // 10) if wsd else None,
                lr_wsd_decay_style="linear" if wsd else None)


def optimizer_options(args) -> dict:
    """megatron ``OptimizerConfig`` fields from the run's flags (AdamW)."""
    return dict(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                clip_grad=args.clip_grad)


def metrics_record(iteration, consumed, dt, n_iters, samples, flops, world_size, lr, res, skipped_total,
                   weighting_scheme: Optional[str] = None) -> dict:
    """One line of ``--metrics-file``: timing, throughput, ``loss`` and every registered loss
    term (``megatron_sd3.loss``; ``denoise_loss`` as the ``weighting_scheme`` weighs it), grad
    norm and skipped iterations."""
    losses = {k: res.losses[k] for k in ("loss", *(t.name for t in loss_terms()))}
    scheme = {} if weighting_scheme is None else {"weighting_scheme": weighting_scheme}
    return {"type": "train", "iteration": iteration, "consumed_samples": consumed,
            "ms_per_iter": 1000 * dt / n_iters, "samples_per_sec": samples / dt,
            "tflops_per_gpu": flops / dt / world_size / 1e12,
            "lr": lr, **losses, **scheme, "grad_norm": res.grad_norm, "skipped_iters": skipped_total}


def log_line(rec: dict, train_iters: int) -> str:
    """The training log line of one metrics record (Megatron-LM's format)."""
    losses = " | ".join(f"{k}: {rec[k]:.6E}" for k in ("loss", *(t.name for t in loss_terms())))
    return (f" iteration {rec['iteration']:8d}/{train_iters:8d} | consumed samples: {rec['consumed_samples']:10d} | "
            f"elapsed time per iteration (ms): {rec['ms_per_iter']:.1f} | samples/s: "
            f"{rec['samples_per_sec']:.2f} | TFLOP/s/GPU: {rec['tflops_per_gpu']:.4f} | "
            f"learning rate: {rec['lr']:.6E} | {losses} | grad norm: "
            f"{(rec['grad_norm'] or float('nan')):.4f} | skipped iterations: {rec['skipped_iters']} |")


# -- validation and samples during training (training/evaluate.py) ---------------------------------------
def _prompt_file(args) -> Optional[str]:
    """``--sample-prompts``, else the data's ``sample_prompts.safetensors``, else None."""
    if args.sample_prompts:
        return args.sample_prompts
    first = args.data_blend[0][1] if args.data_blend else None  # a blend: its first dataset's prompts
    if first and os.path.isfile(os.path.join(first, "sample_prompts.safetensors")):
        return os.path.join(first, "sample_prompts.safetensors")
    return None


def _clip_prompts(args) -> list[str]:
    """The prompt texts the CLIP score compares the samples with: the prompt file's ``prompts``."""
    from megatron_sd3.training.evaluate import load_prompt_embeds

    path = _prompt_file(args)
    if path is None:
        raise ConfigError("--clip-model needs the prompts' texts: give --sample-prompts FILE written by "
                          "tools/preprocess_data.py --prompts")
    try:
        _, _, prompts = load_prompt_embeds(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not prompts:
        raise ConfigError(f"--clip-model: {path} holds no prompt texts (no 'prompts' metadata); write it with "
                          f"tools/preprocess_data.py --prompts")
    return prompts


def _sample_prompts(args, cfg, source):
    """The sample prompts' ``(text, pooled)``: ``--sample-prompts``, else the data's
    ``sample_prompts.safetensors``, else the text of the first ``--sample-num`` samples of ``source``."""
    from megatron_sd3.training.evaluate import load_prompt_embeds

    path = _prompt_file(args)
    if path is not None:
        try:
            text, pooled, _ = load_prompt_embeds(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if tuple(text.shape[1:]) != (cfg.text_seq_len, cfg.joint_attention_dim) or \
                pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ConfigError(f"--sample-prompts {path}: embeddings {tuple(text.shape)} / pooled {tuple(pooled.shape)} "
                              f"do not fit the model ([N, {cfg.text_seq_len}, {cfg.joint_attention_dim}] / "
                              f"[N, {cfg.pooled_projection_dim}]); encode with the model's text settings")
        return text, pooled
    idx = range(source.start, min(source.start + args.sample_num, source.stop))
    rows = [source.dataset[i] for i in idx]
    return (torch.stack([r["prompt_embeds"] for r in rows]).float(),
            torch.stack([r["pooled_prompt_embeds"] for r in rows]).float())


def build_side_tasks(args, cfg, ddp):
    """The ``Evaluator`` (with a validation set), the ``SampleGrid`` (with --sample-interval) and
    the ``ClipEval`` (with --clip-model), or None."""
    from megatron_sd3.training.evaluate import ClipEval, Evaluator, SampleGrid, ValidationSet

    evaluator = sampler = valid = clip = None
    if args.valid_data_path:
        vds = build_dataset(args, cfg, blend=args.valid_blend)
        _check_data_matches_model(vds, cfg, args, path=" ".join(args.valid_data_path))
        valid = ValidationSet(vds)
    elif args.valid_samples:
        ds = build_dataset(args, cfg)
        valid = ValidationSet(ds, len(ds) - args.valid_samples)
    if valid is not None:
        evaluator = Evaluator(cfg, ddp, valid, global_batch_size=args.global_batch_size,
                              micro_batch_size=args.micro_batch_size, seed=args.seed,
                              timesteps=args.eval_timesteps, eval_iters=args.eval_iters, flow=flow_config(args),
                              grad_norms=args.log_text_grad_norms)
        _print0(f" > validation: {evaluator.num_samples} samples x {args.eval_timesteps} timesteps "
                f"({'--valid-data-path ' + ' '.join(args.valid_data_path) if args.valid_data_path else 'held out: the last ' + str(args.valid_samples) + ' samples'})")
    if args.sample_interval or args.clip_model:
        source = valid if valid is not None else ValidationSet(build_dataset(args, cfg))
        hw = tuple(source.dataset.buckets[0])
        out_dir = os.path.join(args.save, "samples") if args.save else None
        layout = {}
        if args.mock_data and args.mock_task == "compositional" and _prompt_file(args) is None:
            # --sample-num captions of seen pairs, as many with a held-out pair (--sample-seed),
            # each judged by the quadrants' nearest objects; the latents saved for the judge tool
            task = source.dataset.compositional
            text, pooled, scenes = task.prompts(args.sample_num, args.sample_seed)
            layout = dict(cols=min(2 * args.sample_num, 16), judge=lambda lat: task.judge(lat, scenes)["follows"],
                          chance=task.chance(), details=lambda lat: _compositional_shares(task.judge(lat, scenes)),
                          save_tensors={"scene_index": torch.tensor([s.index() for s in scenes])})
        elif args.mock_data and args.mock_classes and _prompt_file(args) is None:
            # the conditional task: --sample-num samples of each class's prompt, a row per class,
            # each judged by the class pattern it is nearest
            ds = source.dataset
            text, pooled, labels = ds.prompt_rows(args.sample_num)
            layout = dict(cols=args.sample_num, row_labels=[f"class {c}" for c in range(args.mock_classes)],
                          judge=lambda lat: ds.classify(lat) == labels, chance=1 / args.mock_classes)
        else:
            text, pooled = _sample_prompts(args, cfg, source)
        grid = SampleGrid(ddp, text, pooled, hw, cfg.in_channels, steps=args.sample_steps,
                          cfg_scale=args.sample_cfg_scale, shift=args.sample_shift, seed=args.sample_seed,
                          sd3_root=args.sd3_root, out_dir=out_dir, **layout)
        sampler = grid if args.sample_interval else None
        if args.clip_model and evaluator is not None:  # the same samples the grid shows, scored
            clip = ClipEval(grid, _clip_prompts(args), args.clip_model)
            _print0(f" > CLIP score at each evaluation: {len(clip.prompts)} prompts, {args.clip_model}")
    return evaluator, sampler, clip


def _compositional_shares(judged: dict) -> dict:
    """The compositional judge's shares as the samples row names them."""
    return {"prompt_following_seen": judged["following_seen"], "prompt_following_held_out": judged["following_held_out"],
            "object_position": judged["position"], "object_colour": judged["colour"], "object_shape": judged["shape"]}


def run_side_tasks(args, iteration, evaluator, sampler, ema, metrics, final=False, clip=None, ft=None):
    """Evaluate and/or write a sample grid when due at ``iteration`` (``final``: the last one),
    each in ``--enable-ft-package``'s eval section (its own timeout). Returns the seconds spent
    (kept out of the training throughput)."""
    from megatron_sd3.training.evaluate import eval_log_line

    section = ft.evaluation if ft is not None else nullcontext
    t0 = time.time()
    if evaluator is not None and args.eval_interval and (iteration % args.eval_interval == 0 or final):
        with section():
            rec = evaluator.evaluate(iteration, ema, clip)
        metrics.write(rec)
        _print0(eval_log_line(rec))
    if sampler is not None and (iteration % args.sample_interval == 0 or final):
        with section():
            path = sampler.write(iteration, metrics)
        if path:
            _print0(f" > samples: {path}")
            if sampler.following_line():
                _print0(f" > {sampler.following_line()}")
    return time.time() - t0


def wandb_settings(args) -> Optional[WandbSettings]:
    return WandbSettings(args.wandb_project, args.wandb_exp_name, args.wandb_save_dir) if args.wandb_project else None


def _progress(it, total, loss, enabled):
    if not enabled:
        return
    width = 30
    done = int(width * it / total)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {it}/{total} loss {loss:.4f} ")
    sys.stdout.flush()
    if it == total:
        sys.stdout.write("\n")


def pretrain(args, plan) -> int:
    """Run training; returns the process exit code."""
    # --enable-ft-package: this rank's monitor watches from here (megatron_sd3/training/fault_tolerance.py)
    ft = FaultTolerance.start(args, resumed=plan["load_dir"] is not None)
    info, cfg, dp = setup(args, plan)
    run_config = effective_config(args)
    run_config["model"] = config_to_dict(cfg)
    _print0("------------------------ arguments ------------------------")
    for k, v in sorted(run_config.items()):
        _print0(f"  {k} {'.' * max(1, 40 - len(k))} {v}")
    _print0(f"  world size {info.world_size} = TP {cfg.tensor_model_parallel_size} x PP "
            f"{cfg.pipeline_model_parallel_size} x CP {cfg.context_parallel_size} x DP {dp}  ({info.backend}, "
            f"{'CPU mode' if info.cpu_mode else info.device})")
    _print0(f"  {optional_kernels()}")
    _print0("-------------------- end of arguments ---------------------")
    report_at_start(cfg, args, dp, _print0)  # theoretical memory per rank (megatron_sd3/memory.py)

    built = build_training(cfg, transformer_impl=args.transformer_impl, optimizer=optimizer_options(args),
                           use_distributed_optimizer=args.use_distributed_optimizer,
                           overlap_grad_reduce=args.overlap_grad_reduce,
                           overlap_param_gather=args.overlap_param_gather, ddp_bucket_size=args.ddp_bucket_size,
                           torch_compile=args.torch_compile, torch_compile_mode=args.torch_compile_mode,
                           scheduler=scheduler_options(args), ema_decay=args.ema_decay,
                           ema_update_interval=args.ema_update_interval, ema_warmup=args.ema_warmup,
                           ema_inv_gamma=args.ema_inv_gamma, ema_power=args.ema_power)
    ddp, optimizer, scheduler, ema, models = built.ddp, built.optimizer, built.scheduler, built.ema, built.models
    if args.torch_compile:
        _print0(f" > torch.compile: {built.compiled_blocks} joint blocks, mode {args.torch_compile_mode} "
                f"(compiled on their first iteration)")

    iteration, consumed, skipped_total = 0, 0, 0
    load_dir = plan["load_dir"]
    if load_dir is not None:
        common = ckpt.load_checkpoint(load_dir, models, optimizer, ema, scheduler,
                                      model_config=config_to_dict(cfg), load_optim=not args.no_load_optim,
                                      load_rng=not args.no_load_rng, global_batch_size=args.global_batch_size)
        use_fused_torch_adam(optimizer)  # loaded param groups carry the saver's "fused"/"foreach"
        iteration, consumed = common["iteration"], common["consumed_samples"]
        skipped_total = common.get("skipped_iters", 0)
        _print0(f" > resumed from {load_dir} at iteration {iteration} ({consumed} samples consumed)")
    elif args.load:
        _print0(f" > {ckpt.fresh_start_note(args.load)}")

    if ft is not None:
        for line in (ft.timeouts_line(), ft.restart_line()):
            if line:
                _print0(f" > {line}")
    step = TrainStep(cfg, ddp, optimizer, global_batch_size=args.global_batch_size,
                     micro_batch_size=args.micro_batch_size, seed=args.seed,
                     flow=flow_config(args),
                     cuda_graphs=args.torch_compile_mode == "reduce-overhead")
    data_iter = blend = None
    if step.first or step.last:
        from megatron_sd3.data.sampler import build_data_iterator, small_bucket_report

        ds = build_dataset(args, cfg)
        _check_data_matches_model(ds, cfg, args)
        small = small_bucket_report(ds, args.global_batch_size, args.train_small_buckets)
        if small and dist.get_rank() == 0:
            print(f" > {small}", flush=True)
        keys = None if step.first else ("latents", "mask")
        blend = ds if hasattr(ds, "drawn") else None
        data_iter = build_data_iterator(ds, args.global_batch_size, args.micro_batch_size,
                                        ps.get_data_parallel_rank(), dp, args.seed, consumed_samples=consumed,
                                        keys=keys, holdout=args.valid_samples or 0,
                                        train_small_buckets=args.train_small_buckets)
        batch_plan = data_iter.plan
        # whole iterations read (and pinned on CUDA) ahead in the background
        from megatron_sd3.data.prefetch import IterationPrefetcher

        data_iter = IterationPrefetcher(data_iter, step.num_microbatches)

    start_iteration = iteration
    handler = SignalHandler() if args.exit_signal_handler else None
    metrics = MetricsWriter(args.metrics_file, args.tensorboard_dir, wandb_settings(args), run_config)
    evaluator, sampler, clip = build_side_tasks(args, cfg, ddp)
    progress = (not args.no_progress) and sys.stdout.isatty() and dist.get_rank() == 0
    if evaluator is not None and args.eval_at_start:
        with ft.evaluation() if ft else nullcontext():
            rec = evaluator.evaluate(iteration, ema, clip)
        metrics.write(rec)
        from megatron_sd3.training.evaluate import eval_log_line

        _print0(eval_log_line(rec))
    start = time.time()
    # losses stay device tensors; the host reads them at log intervals and at the end
    first_loss = last_loss = None
    drawn_log = [0] * len(blend.datasets) if blend is not None else []
    shown_loss = float("nan")
    in_a_row = 0
    t_log, samples_log, flops_log = time.time(), 0, 0.0
    exit_reason, code = "finished", 0

    async_saver = ckpt.AsyncSaver() if args.async_save else None

    def save(it):
        if args.save:
            with params_synced(ddp), ft.checkpointing(it) if ft else nullcontext():  # params: --overlap-param-gather
                ckpt.save_checkpoint(args.save, it, models, optimizer, ema, scheduler,
                                     consumed_samples=consumed, skipped_iters=skipped_total,
                                     model_config=config_to_dict(cfg), run_config=run_config,
                                     global_batch_size=args.global_batch_size, async_saver=async_saver,
                                     data_blend=plan["data_blend"])

    while iteration < args.train_iters:
        if async_saver is not None:
            with ft.checkpointing(finalization=True) if ft else nullcontext():
                async_saver.maybe_finalize(blocking=False)
        with ft.step() if ft else nullcontext():  # a stuck data read is a hang too
            mbs = next(data_iter) if data_iter is not None else None
            if blend is not None:  # samples of each blended dataset in this global batch (from the plan)
                drawn_log = [a + b for a, b in zip(drawn_log, blend.drawn(batch_plan.batch(consumed // args.global_batch_size)))]
            res = step(mbs, consumed)
        iteration += 1
        consumed += args.global_batch_size
        if args.torch_compile and iteration == start_iteration + 1:
            from torch._dynamo.utils import counters

            breaks = sum(counters["graph_break"].values())
            _print0(f" > torch.compile: {counters['stats']['unique_graphs']} graphs compiled, {breaks} graph "
                    f"breaks in the first iteration ({time.time() - start:.1f} s including the step)")
        if res.skipped:
            skipped_total += 1
            in_a_row += 1
            if in_a_row >= args.max_skipped_iters:
                _print0(f"error: {in_a_row} iterations in a row had a NaN/Inf loss (last at iteration {iteration}); "
                        f"stopping. Lower --lr, raise --lr-warmup-iters or check the data.")
                exit_reason, code = "diverged", 3
                break
        else:
            in_a_row = 0
            scheduler.step(increment=1)
            if ema is not None and iteration % ema.interval == 0:
                with params_synced(ddp):  # --overlap-param-gather: average the updated weights
                    ema.update(iteration)
            first_loss = res.loss_tensor[0] if first_loss is None else first_loss
            last_loss = res.loss_tensor[0]
        samples_log += args.global_batch_size
        flops_log += model_flops_per_sample(cfg, res.latent_hw, training=True) * args.global_batch_size
        log_step = iteration % args.log_interval == 0 or iteration == args.train_iters
        if log_step:
            shown_loss = res.losses["loss"]  # the host reads the losses here, once per interval
        _progress(iteration, args.train_iters, shown_loss, progress)
        if log_step:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.time() - t_log
            n_iters = iteration % args.log_interval or args.log_interval
            rec = metrics_record(iteration, consumed, dt, n_iters, samples_log, flops_log, info.world_size,
                                 optimizer.param_groups[0]["lr"], res, skipped_total, step.flow.weighting_scheme)
            if ft is not None:
                rec["ft_restarts"] = ft.restarts
            if blend is not None:  # rank 0 reads data (first stage): it has the blend
                rec["dataset_samples"] = dict(zip(blend.names, drawn_log))
                drawn_log = [0] * len(drawn_log)
            metrics.write(rec)
            if not progress:
                _print0(log_line(rec, args.train_iters))
            t_log, samples_log, flops_log = time.time(), 0, 0.0
        # -- validation and samples (not at the last iteration: after the loop) --
        if iteration < args.train_iters:
            t_log += run_side_tasks(args, iteration, evaluator, sampler, ema, metrics, clip=clip, ft=ft)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
        if handler is not None and handler.any_rank():
            _print0(f" > SIGTERM received: saving at iteration {iteration} and exiting")
            if not (args.save_interval and iteration % args.save_interval == 0):
                save(iteration)
            exit_reason = "signal"
            break
        if args.exit_interval and iteration % args.exit_interval == 0:
            _print0(f" > --exit-interval {args.exit_interval}: saving and exiting at iteration {iteration}")
            if not (args.save_interval and iteration % args.save_interval == 0):
                save(iteration)
            exit_reason = "exit-interval"
            break
        if args.exit_duration_in_mins:
            t = torch.tensor([time.time() - start], device=device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() / 60 > args.exit_duration_in_mins:
                _print0(f" > --exit-duration-in-mins {args.exit_duration_in_mins} reached: saving and exiting")
                save(iteration)
                exit_reason = "duration"
                break
    else:
        run_side_tasks(args, iteration, evaluator, sampler, ema, metrics, final=True, clip=clip, ft=ft)
        if args.save and not (args.save_interval and iteration % args.save_interval == 0):
            save(iteration)

    if async_saver is not None:
        with ft.checkpointing(finalization=True) if ft else nullcontext():
            async_saver.maybe_finalize(blocking=True)
    if ft is not None:
        ft.finish()
    if data_iter is not None:
        data_iter.close()
    metrics.close()
    elapsed = time.time() - start
    _print0("-------------------------- summary --------------------------")
    _print0(f"  stopped: {exit_reason} at iteration {iteration}/{args.train_iters}")
    if first_loss is not None:
        _print0(f"  loss: {float(first_loss):.4f} (first) -> {float(last_loss):.4f} (last)")
    run_samples = (iteration - start_iteration) * args.global_batch_size
    _print0(f"  samples/s: {run_samples / max(elapsed, 1e-9):.2f} ({run_samples} samples in {elapsed:.1f} s)")
    _print0(f"  skipped iterations: {skipped_total}")
    if sampler is not None and sampler.following_line():
        _print0(f"  {sampler.following_line()}")
    if args.save:
        latest = ckpt.read_latest(args.save)
        _print0(f"  checkpoint: {ckpt.iter_dir(args.save, latest) if latest is not None else 'none'}")
    _print0("-------------------------------------------------------------")
    return code


def _rank_prefix() -> str:
    return f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_world_size() > 1 else ""


def check_run(argv=None, args=None):
    """Parse the flags (unless ``args`` are given) and run ``preflight``: ``(args, plan)``, or exit
    code 2 after one error line on stderr. ``main`` and ``python -m megatron_sd3.env`` start here."""
    from megatron_sd3.arguments import parse_args
    from megatron_sd3.data.shards import ShardError

    args = parse_args(argv) if args is None else args
    errors = (ConfigError, LayoutError, ckpt.CheckpointError, ShardError, RuntimeError, MetricsError)
    try:
        return args, preflight(args)
    except errors as e:
        print(f"pretrain_sd3.py: error: {e}", file=sys.stderr, flush=True)
        return 2


def main(argv=None) -> int:
    from megatron_sd3.data.shards import ShardError

    checked = check_run(argv)
    if isinstance(checked, int):
        return checked
    args, plan = checked
    if args.check_config:  # what launch.sh runs once before the ranks: the checks, then the report
        from megatron_sd3.env import report

        print(report(args, plan), flush=True)
        print(f"pretrain_sd3.py: checks passed (world size {os.environ.get('WORLD_SIZE', '1')}, "
              f"data-parallel size {plan['dp']})", file=sys.stderr, flush=True)
        return 0
    from megatron_sd3.training.watchdog import first_to_fail, peer_failure

    # An error met by running ranks is said once, by the first rank that meets it, naming it; the
    # others exit quietly with a non-zero code (watchdog.first_to_fail).
    try:
        return pretrain(args, plan)
    except (ConfigError, ckpt.CheckpointError, ShardError) as e:
        if not getattr(e, "quiet", False) and first_to_fail():
            print(f"pretrain_sd3.py: error: {_rank_prefix()}{e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # a collective failed: a peer died or hung (one line, not a traceback)
        if peer_failure(e) is None:
            raise
        if first_to_fail():
            print(f"pretrain_sd3.py: error: {_rank_prefix()}{peer_failure(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        from megatron_sd3.distributed import destroy_distributed

        destroy_distributed()
