"""Command line of ``pretrain_sd3.py``: Megatron-LM's flag names, a TOML preset underneath.

Precedence: built-in defaults < ``--config FILE.toml`` < flags given on the command line.

The run configuration is declared once, in ``SECTIONS``: each TOML section (``[model]``,
``[parallel]``, ``[training]``, ...) is a list of ``Field`` declarations (name, type, default,
help, choices, range check). The flags (``--micro-batch-size``), the TOML keys of the section
(``[training] micro_batch_size = 2``) and the entries of ``effective_config`` are all made from
them, so a new setting is one ``Field(...)`` line in its section. Unknown sections, keys and
flags (with a close-match hint), wrong types, choices and ranges are one-line errors naming the
key or flag, before any work starts.
"""
from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_sd3.flow_matching import SCHEMES, TIMESTEP_SAMPLING, FlowMatchingConfig, scheme_problem
from megatron_sd3.config import (
    MODEL_FIELDS, ConfigError, Field, above, at_least, check_model_fields, check_table, load_toml)


@dataclass
class Section:
    """A TOML section and the argparse group of its flags."""

    name: str
    title: str
    fields: list[Field]


def _ema_decay(v) -> Optional[str]:
    return None if 0 <= v < 1 else "in [0, 1) (0 = off)"


F = Field
SECTIONS: dict[str, Section] = {s.name: s for s in [
    Section("model", "model: the preset and what overrides it", MODEL_FIELDS),
    Section("parallel", "parallelism", [
        F("tensor_model_parallel_size", int, 1, "tensor-parallel ranks", check=at_least(1)),
        F("pipeline_model_parallel_size", int, 1, "pipeline stages", check=at_least(1)),
        F("pipeline_layers", str, None, "blocks per pipeline stage, e.g. 8,7 (default: balanced)"),
        F("num_virtual_stages_per_pipeline_rank", int, None,
          "interleaved 1F1B: model chunks per pipeline rank (equal blocks per stage)"),
        F("use_distributed_optimizer", bool, False, "megatron's distributed optimizer"),
        F("overlap_grad_reduce", bool, False, "overlap the gradient reduction with the backward pass"),
        F("overlap_param_gather", bool, False, "overlap the distributed optimizer's parameter all-gather "
          "with the next forward pass (needs --use-distributed-optimizer --overlap-grad-reduce)"),
        F("ddp_bucket_size", int, None, "parameters per DDP communication bucket (default: megatron's)",
          check=at_least(1)),
        F("sequence_parallel", bool, False, "split the image and text streams along the sequence over the "
          "tensor-parallel ranks between the tensor-parallel regions (needs TP > 1)"),
        F("context_parallel_size", int, 1, "context-parallel ranks: each sample's image tokens split into "
          "contiguous chunks over them, the text whole on each, attention by an all-to-all over heads "
          "(Ulysses)", check=at_least(1)),
    ]),
    Section("training", "training", [
        F("micro_batch_size", int, 1, "samples per microbatch", check=at_least(1)),
        F("global_batch_size", int, None, "samples per iteration (default: micro batch x data-parallel size)",
          check=at_least(1)),
        F("train_iters", int, 100, "iterations to train", check=at_least(1)),
        F("lr", float, 1e-4, "peak learning rate", check=at_least(0)),
        F("min_lr", float, 0.0, "learning rate at the end of the decay", check=at_least(0)),
        F("lr_warmup_iters", int, 0, "linear warmup iterations", check=at_least(0)),
        F("lr_decay_iters", int, None, "decay length (default: train-iters)", check=at_least(1)),
        F("lr_decay_style", str, "cosine", "learning-rate decay",
          choices=("constant", "linear", "cosine", "inverse-square-root", "WSD")),
        F("weight_decay", float, 0.0, "AdamW weight decay", check=at_least(0)),
        F("adam_beta1", float, 0.9, "Adam beta1"),
        F("adam_beta2", float, 0.999, "Adam beta2"),
        F("adam_eps", float, 1e-8, "Adam epsilon", check=above(0)),
        F("clip_grad", float, 1.0, "gradient-norm clipping (0 = off)", check=at_least(0)),
        F("seed", int, 1234, "random seed"),
        F("bf16", bool, False, "bf16 mixed precision (GPU; CPU runs stay fp32)"),
        F("ema_decay", float, 0.9999, "EMA of the weights (0 = off)", check=_ema_decay),
        F("ema_update_interval", int, 1, "iterations between EMA updates", check=at_least(1)),
        F("ema_warmup", str, "none", "EMA decay warmup as diffusers' EMAModel: ratio = min(decay, (1+s)/(10+s)), "
          "power = min(decay, 1-(1+s/inv_gamma)^-power)", choices=("none", "ratio", "power")),
        F("ema_inv_gamma", float, 1.0, "inverse gamma of --ema-warmup power", check=above(0)),
        F("ema_power", float, 2 / 3, "exponent of --ema-warmup power", check=above(0)),
        F("max_skipped_iters", int, 10, "stop after this many NaN/Inf iterations in a row", check=at_least(1)),
    ]),
    Section("flow", "flow matching: diffusers' --weighting-scheme names a timestep density and a loss "
            "weight together (none, sigma_sqrt, cosmap: uniform t; logit_normal, mode: their own density; "
            "sigma_sqrt 1/t^2, cosmap 2/(pi(1-2t+2t^2)), the others unit weights); --timestep-sampling "
            "names the density alone. Give either, or both when they agree; --timestep-shift then "
            "shifts the drawn t", [
        F("weighting_scheme", str, None, "diffusers' SD3 density and loss weight (default: the "
          "--timestep-sampling density with unit weights; logit_normal)", choices=SCHEMES),
        F("timestep_sampling", str, None, "timestep density (default: the --weighting-scheme's; logit_normal)",
          choices=TIMESTEP_SAMPLING),
        F("logit_mean", float, 0.0, "mean of the logit-normal timesteps (t is the noise level, as in the SD3 "
          "paper: > 0 trains noisier; diffusers' script indexes descending timesteps with it, the other way)"),
        F("logit_std", float, 1.0, "standard deviation of the logit-normal timesteps", check=above(0)),
        F("mode_scale", float, 1.29, "scale of the mode density"),
        F("timestep_shift", float, 1.0, "SD3's timestep shift", check=above(0)),
        F("precondition_outputs", bool, False, "the loss compares the x0 the prediction implies "
          "(x_t - t * pred) with x0, as diffusers' --precondition-outputs"),
        F("text_dropout", float, 0.0, "probability of dropping the text (CFG)",
          check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
    ]),
    Section("data", "data (one source: --data-path or --mock-data; one given as a flag replaces the TOML's)", [
        F("data_path", list, None, "dataset directory made by tools/preprocess_data.py, or a blend as "
          "Megatron-LM's: weight-directory pairs, e.g. 0.7 A 0.3 B (TOML: \"DIR\" or [0.7, \"A\", 0.3, \"B\"])",
          exclusive="data source", item=str),
        F("mock_data", bool, False, "deterministic synthetic data (as Megatron-LM)", exclusive="data source"),
        F("mock_num_samples", int, 100_000, "samples of the synthetic dataset", check=at_least(1)),
        F("mock_latent_size", str, None, "HxW of mock latents, e.g. 32x32 (default: the model's sample size)"),
        F("mock_with_mask", bool, False, "synthetic samples carry a loss mask"),
        F("mock_classes", int, 0, "a conditional synthetic task: K classes, each a fixed text embedding "
          "and its own latent pattern plus noise (0 = plain random samples)", check=at_least(0)),
        F("mock_task", str, "random", "the synthetic task: random samples (or --mock-classes K), or "
          "compositional: two coloured shapes in quadrants, captioned in words through a tokenizer and a "
          "frozen T5 encoder, some colour x shape pairs held out of training (docs/design.md)",
          choices=("random", "compositional")),
        F("train_small_buckets", bool, False, "train aspect buckets smaller than one global batch: each gives one "
          "global batch per epoch, its samples repeated to fill it (default: they are skipped, with a warning)"),
    ]),
    Section("evaluation", "validation (held-out data, forward only, fixed noise)", [
        F("valid_data_path", list, None, "validation dataset directory made by tools/preprocess_data.py, or "
          "a blend of them (weight-directory pairs)", item=str),
        F("valid_samples", int, None, "hold out the last N samples of --data-path / the mock source "
          "(never trained on) as the validation set", check=at_least(1)),
        F("eval_interval", int, None, "iterations between evaluations (and one at the end)", check=at_least(1)),
        F("eval_iters", int, 0, "validation global batches per evaluation (0 = the whole validation set, "
          "in whole global batches)", check=at_least(0)),
        F("eval_timesteps", int, 8, "timesteps per sample: stratified t = (i + 0.5)/K, i < K, each sample "
          "noised with a fixed noise per (sample, t). diffusion-pipe evaluates at a few fixed quantiles of "
          "t (e.g. 0.1, 0.5, 0.9); these are the K equal-mass quantile midpoints of a uniform t, so the mean "
          "over them estimates the loss averaged uniformly over t", check=at_least(1)),
        F("eval_at_start", bool, False, "evaluate once before the first iteration"),
        F("log_text_grad_norms", bool, False, "at each evaluation, the gradient norm of each loss term alone on "
          "the joint blocks' text streams (one validation global batch with training's noise, no optimizer "
          "step): grad_norm_text_denoise, grad_norm_text_recon (gamma included) and their ratio "
          "text_recon_grad_ratio"),
        F("clip_model", str, None, "local transformers CLIPModel folder: at each evaluation, the CLIP score of "
          "the sample prompts' fixed-seed samples (VAE-decoded: needs --sd3-root) against the prompt texts "
          "of the prompt file (tools/preprocess_data.py --prompts)"),
    ]),
    Section("sampling", "samples during training", [
        F("sample_interval", int, None, "iterations between sample grids (and one at the end), "
          "written to SAVE/samples/iter_NNNNNNN.png", check=at_least(1)),
        F("sample_prompts", str, None, "safetensors of prompt embeddings (tools/preprocess_data.py --prompts); "
          "default: DATA/sample_prompts.safetensors, else the text of the first --sample-num "
          "validation (or dataset) samples"),
        F("sample_num", int, 4, "prompts taken from the data when there is no prompt file (--mock-classes: "
          "samples of each class, a grid row per class)", check=at_least(1)),
        F("sample_steps", int, 20, "Euler steps per sample", check=at_least(1)),
        F("sample_cfg_scale", float, 4.0, "classifier-free guidance scale (<= 1: none)"),
        F("sample_shift", float, 3.0, "timestep shift of the sampling schedule", check=above(0)),
        F("sample_seed", int, 0, "seed of the samples' starting noise (sample i: seed + i)"),
        F("sd3_root", str, None, "diffusers SD3 folder: decode samples with its VAE (default: a latent preview)"),
    ]),
    Section("checkpoint", "checkpointing", [
        F("save", str, None, "checkpoint directory"),
        F("load", str, None, "checkpoint directory to resume from"),
        F("save_interval", int, None, "iterations between checkpoints (default: at the end only)",
          check=at_least(1)),
        F("exit_signal_handler", bool, False, "on SIGTERM: save and exit 0"),
        F("exit_duration_in_mins", float, None, "save and exit after this long", check=above(0)),
        F("no_load_optim", bool, False, "resume the weights only, not the optimizer", negatable=False),
        F("no_load_rng", bool, False, "do not restore the random states", negatable=False),
        # crash-safe resume (megatron_sd3/training/checkpointing.py)
        F("exit_interval", int, None, "save and exit at iteration N (a multiple of N)", check=above(0)),
        F("ckpt_step", int, None, "load iter_N of --load instead of the latest"),
        F("async_save", bool, False, "write checkpoints in the background (dist_checkpointing's async save)"),
        F("distributed_timeout_minutes", float, 10.0,
          "a collective or rendezvous waiting longer for a peer ends the rank with an error", check=above(0)),
    ]),
    Section("fault_tolerance", "fault tolerance (nvidia-resiliency-ext; launch.sh starts ft_launcher)", [
        F("enable_ft_package", bool, False, "hang detection by nvidia-resiliency-ext's rank monitors: the training "
          "loop reports its setup, step, eval and checkpointing sections; a rank that stops answering is killed "
          "and the workers restart from the last checkpoint (launch.sh: MAX_RESTARTS, FT_HEARTBEAT_TIMEOUT, ...)"),
        F("calc_ft_timeouts", bool, False, "learn the section timeouts from the run (after each save and at the "
          "end) and keep them in SAVE/ft_state.json for the next start"),
    ]),
    Section("logging", "logging", [
        F("log_interval", int, 10, "iterations between log lines", check=at_least(1)),
        F("metrics_file", str, None, "JSON lines of per-iteration figures"),
        F("tensorboard_dir", str, None, "TensorBoard event directory"),
        F("wandb_project", str, None, "Weights & Biases project: everything sent to TensorBoard goes there too "
          "(needs wandb; WANDB_MODE=offline for no network)"),
        F("wandb_exp_name", str, None, "W&B run name"),
        F("wandb_save_dir", str, None, "W&B run directory (default: wandb's)"),
        F("no_progress", bool, False, "no progress bar even on a terminal", negatable=False),
    ]),
    Section("recompute", "activation recomputation (megatron_sd3/recompute.py)", [
        F("recompute_granularity", str, None,
          "full: recompute whole joint blocks; selective: keep the GEMM outputs, recompute "
          "norms/modulation, qk-norm + concat and GELU", choices=("full", "selective")),
        F("recompute_method", str, None,
          "full: uniform = units of --recompute-num-layers blocks; block = the first "
          "--recompute-num-layers blocks of each stage", choices=("uniform", "block")),
        F("recompute_num_layers", int, None, "blocks per recompute unit (uniform) or blocks recomputed (block)",
          check=at_least(1)),
        F("recompute_modules", list, None, "selective: any of layernorm qk_norm mlp_act (default: all)",
          item=str),
    ]),
    Section("backend", "kernels and compilation", [
        F("transformer_impl", str, "local", "layer filling: megatron-core's local layers or Transformer Engine",
          choices=("local", "transformer_engine")),
        F("attention_backend", str, "auto",
          "attention kernel (Megatron-LM's flag): flash = FlashAttention-2, fused = cuDNN, "
          "unfused/local = plain math, auto = the framework's choice",
          choices=("auto", "flash", "fused", "unfused", "local")),
        F("torch_compile", bool, False, "torch.compile each joint block (fuses the elementwise work around "
          "the GEMMs; torchao FP8 needs it to be faster than bf16)"),
        F("torch_compile_mode", str, "default", "torch.compile mode of the joint blocks; reduce-overhead replays "
          "them as CUDA graphs (needs --torch-compile and a CUDA GPU)",
          choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs")),
        F("cuda_graph_impl", str, "none", "Megatron-LM's flag, for megatron-core's CUDA graphs of "
          "single-output layers; the joint blocks are graphed by --torch-compile-mode reduce-overhead",
          choices=("none", "local", "transformer_engine")),
    ]),
    Section("fp8", "FP8", [
        F("fp8_format", str, None, "FP8 GEMMs in the joint blocks (default: off)", choices=("e4m3", "hybrid")),
        F("fp8_recipe", str, None, "default: delayed with transformer_engine, tensorwise with local "
          "(torchao); rowwise: torchao's per-row scales (e4m3, TP=1)", choices=("tensorwise", "rowwise", "delayed")),
        F("fp8_gemms", str, "rule", "which joint-block GEMMs run in FP8: rule = where FP8 plus its casts beat "
          "bf16 by the step-time model (tools/fp8_plan.py; the text stream's and modulation GEMMs stay bf16), "
          "all = every one (torchao; Transformer Engine runs all)", choices=("rule", "all")),
        F("fp8_amax_history_len", int, 1, "amax history of delayed scaling", check=at_least(1)),
        F("first_last_layers_bf16", bool, False, "keep the first and last joint blocks in bf16"),
    ]),
]}
del F


def fields() -> dict[str, Field]:
    """Every declared field by name (names are unique across sections)."""
    return {f.name: f for s in SECTIONS.values() for f in s.fields}


def _help(section: Section, f: Field) -> str:
    text = f.help
    if f.default is None and section.name == "model" and f.name != "preset":
        text += " (default: the preset's)"
    elif f.default is not None and not (f.type is bool and f.default is False):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the bad flag, without the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The flags of every declared field; values not given are absent from the namespace."""
    p = _OneLineParser(
        prog="pretrain_sd3.py", allow_abbrev=False,
        usage="%(prog)s [--config FILE.toml] [--check-config] [FLAG ...]",
        description="Pretrain sd3_light (SD3 MMDiT) with tensor, pipeline and data parallelism on "
                    "megatron-core. Flags override the --config TOML, which overrides the defaults. "
                    "Each group below is a TOML section of the same keys with underscores.")
    p.add_argument("--config", default=None,
                   help="TOML preset: [" + "], [".join(SECTIONS) + "] sections")
    p.add_argument("--check-config", action="store_true",
                   help="run every check that needs no process group (flags, TOML, parallel layout, "
                        "data, checkpoint to resume) and exit; launch.sh does this before starting ranks")
    for section in SECTIONS.values():
        g = p.add_argument_group(f"{section.title} (TOML [{section.name}])")
        for f in section.fields:
            kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(section, f))
            if f.type is bool:
                kw["action"] = argparse.BooleanOptionalAction if f.negatable else "store_true"
            elif f.type is list:
                kw.update(type=f.item, nargs="*", metavar="N" if f.item is int else
                          "DIR" if f.name.endswith("data_path") else "NAME")
            else:
                kw["type"] = f.type
                if f.choices:
                    kw["metavar"] = "{" + ",".join(map(str, f.choices)) + "}"
            g.add_argument(f.flag, **kw)
    return p


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    flags = [a for a in extras if a.startswith("-")] or extras
    known = [o for a in parser._actions for o in a.option_strings]
    parts = []
    for a in flags:
        close = difflib.get_close_matches(a.split("=", 1)[0], known, n=1)
        parts.append(a + (f" (did you mean {close[0]}?)" if close else ""))
    return "unrecognized arguments: " + ", ".join(parts)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults < TOML < command line; then ``validate``. Errors exit 2 with a one-line message.

    Every declared field is an attribute of the result; ``args.model`` holds the checked [model]
    fields that were given (TOML or flags) plus ``preset``."""
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unrecognized(parser, extras))
    given = vars(ns)
    declared = fields()
    try:
        from_toml: dict[str, Any] = {}
        if ns.config:
            for section, table in load_toml(ns.config).items():
                if section not in SECTIONS:
                    close = difflib.get_close_matches(section, list(SECTIONS), n=1)
                    hint = f" (did you mean [{close[0]}]?)" if close else ""
                    raise ConfigError(f"{ns.config}: unknown section [{section}]{hint}; "
                                      f"valid: {', '.join(SECTIONS)}")
                from_toml.update(check_table(table, SECTIONS[section].fields, f"{ns.config} [{section}]"))
        from_cli = {name: declared[name].checked(v, declared[name].flag)
                    for name, v in given.items() if name in declared}
        # alternatives (the data source): one given on the command line replaces the TOML's
        replaced = {declared[n].exclusive for n in from_cli} - {None}
        from_toml = {n: v for n, v in from_toml.items()
                     if n in from_cli or declared[n].exclusive not in replaced}
        chosen = {**from_toml, **from_cli}
        args = argparse.Namespace(config=ns.config, check_config=ns.check_config)
        for name, f in declared.items():
            setattr(args, name, chosen.get(name, f.default))
        model = {"preset": args.preset}
        model.update((f.name, chosen[f.name]) for f in MODEL_FIELDS if f.name in chosen)
        args.model = check_model_fields(model, where="model")
        validate(args)
    except ConfigError as e:
        parser.exit(2, f"pretrain_sd3.py: error: {e}\n")
    return args


def validate(args) -> None:
    """Cross-flag rules that need no process group (single-value ranges are in the fields)."""
    def bad(msg):
        raise ConfigError(msg)

    if args.min_lr > args.lr:
        bad(f"need 0 <= --min-lr <= --lr, got lr={args.lr} min_lr={args.min_lr}")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters and args.lr_decay_style != "constant":
        bad(f"--lr-warmup-iters {args.lr_warmup_iters} must be < the decay length {decay_iters} "
            f"(--lr-decay-iters, default --train-iters); lower the warmup or set --lr-decay-iters")
    if args.save_interval and not args.save:
        bad("--save-interval needs --save DIR")
    if args.async_save and not args.save:
        bad("--async-save needs --save DIR")
    if args.exit_signal_handler and not args.save:
        bad("--exit-signal-handler saves on SIGTERM and needs --save DIR")
    if args.calc_ft_timeouts and not args.enable_ft_package:
        bad("--calc-ft-timeouts learns the timeouts of --enable-ft-package; add it")
    if args.enable_ft_package:
        from megatron_sd3.training.fault_tolerance import check_installed

        problem = check_installed()
        if problem:
            bad(problem)
        if not (args.save and args.load):
            bad("--enable-ft-package restarts the same command from its last checkpoint: give --save DIR --load DIR")
    problem = scheme_problem(args.timestep_sampling, args.weighting_scheme)
    if problem:
        bad(problem)
    # the effective config names both: the scheme of the density, the density of the scheme
    resolved = FlowMatchingConfig(timestep_sampling=args.timestep_sampling, weighting_scheme=args.weighting_scheme)
    args.timestep_sampling, args.weighting_scheme = resolved.timestep_sampling, resolved.weighting_scheme
    from megatron_sd3.data.blend import BlendError, parse_blend

    try:
        args.data_blend = parse_blend(args.data_path, "--data-path")
        args.valid_blend = parse_blend(args.valid_data_path, "--valid-data-path")
    except BlendError as e:
        bad(str(e))
    if bool(args.data_path) == bool(args.mock_data):
        bad("give exactly one data source: --data-path DIR (tools/preprocess_data.py) or --mock-data")
    if args.mock_latent_size is not None:
        try:
            h, w = (int(v) for v in args.mock_latent_size.lower().split("x"))
            assert h > 0 and w > 0
        except Exception:
            bad(f"--mock-latent-size must look like 32x32, got {args.mock_latent_size!r}")
    if args.mock_task == "compositional":
        if args.mock_classes:
            bad(f"--mock-task compositional and --mock-classes {args.mock_classes} are two tasks; give one")
        if not args.mock_data:
            bad("--mock-task compositional is a --mock-data source; add --mock-data")
    if args.valid_data_path and args.valid_samples:
        bad("give one validation set: --valid-data-path DIR or --valid-samples N")
    if args.eval_interval and not (args.valid_data_path or args.valid_samples):
        bad("--eval-interval needs a validation set: --valid-data-path DIR or --valid-samples N")
    if args.eval_at_start and not (args.valid_data_path or args.valid_samples):
        bad("--eval-at-start needs a validation set: --valid-data-path DIR or --valid-samples N")
    if args.valid_samples and args.mock_data and args.valid_samples >= args.mock_num_samples:
        bad(f"--valid-samples {args.valid_samples} leaves no training samples of --mock-num-samples "
            f"{args.mock_num_samples}; hold out fewer")
    if args.clip_model and not (args.eval_interval or args.eval_at_start):
        bad("--clip-model scores samples at each evaluation; it needs --eval-interval N (or --eval-at-start)")
    if args.clip_model and not args.sd3_root:
        bad("--clip-model scores VAE-decoded samples and needs --sd3-root DIR (a latent preview is no "
            "image a CLIP model can judge)")
    if args.sample_interval and not args.save:
        bad("--sample-interval writes SAVE/samples/ and needs --save DIR")
    if (args.wandb_exp_name or args.wandb_save_dir) and not args.wandb_project:
        bad("--wandb-exp-name / --wandb-save-dir need --wandb-project NAME")
    if args.pipeline_layers is not None:
        try:
            args.pipeline_layers = [int(v) for v in str(args.pipeline_layers).split(",")]
        except ValueError:
            bad(f"--pipeline-layers must be comma-separated integers, got {args.pipeline_layers!r}")
    from megatron_sd3.recompute import check_recompute_fields

    problem = check_recompute_fields(args.recompute_granularity, args.recompute_method,
                                     args.recompute_num_layers, args.recompute_modules)
    if problem:
        bad(problem)
    if args.recompute_granularity == "selective" and args.torch_compile:
        bad("--recompute-granularity selective is for eager runs: with --torch-compile the compiler "
            "already recomputes the elementwise work; use --recompute-granularity full or drop it")
    if args.cuda_graph_impl != "none":
        bad(f"--cuda-graph-impl {args.cuda_graph_impl}: megatron-core's CUDA graphs capture layers with one "
            "hidden-state output, and a joint block has two streams; use --torch-compile "
            "--torch-compile-mode reduce-overhead (CUDA graphs of the compiled blocks)")
    if args.sequence_parallel and args.tensor_model_parallel_size < 2:
        bad("--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
            "--tensor-model-parallel-size >= 2; drop --sequence-parallel or raise TP")
    if args.context_parallel_size > 1 and args.transformer_impl != "local":
        bad(f"--context-parallel-size {args.context_parallel_size} runs on --transformer-impl local (its "
            f"all-to-all over heads wraps the local attention kernel); use --transformer-impl local or "
            f"--context-parallel-size 1")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        bad("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
            "(megatron's parameter all-gather comes from the distributed optimizer's shards)")
    if args.fp8_format and args.sequence_parallel and args.transformer_impl == "local":
        bad("--sequence-parallel with FP8 needs --transformer-impl transformer_engine (the torchao "
            "FP8 GEMMs do not all-gather/reduce-scatter the sequence); drop one of them")
    if args.fp8_recipe is None:
        args.fp8_recipe = "delayed" if args.transformer_impl == "transformer_engine" else "tensorwise"
    if args.fp8_format:
        from megatron_sd3.backends.fp8_settings import recipe_problem

        problem = recipe_problem(args.fp8_recipe, args.fp8_format, args.transformer_impl,
                                 args.tensor_model_parallel_size)
        if problem:
            bad(problem)


def mock_latent_hw(args, sample_size: int) -> tuple[int, int]:
    """The mock source's latent size: ``--mock-latent-size HxW`` (checked by :func:`validate`), or
    the model's ``sample_size`` square."""
    if getattr(args, "mock_latent_size", None):
        h, w = (int(v) for v in args.mock_latent_size.lower().split("x"))
        return h, w
    return int(sample_size), int(sample_size)


def flow_config(args) -> FlowMatchingConfig:
    """The run's flow-matching inputs (timestep density, loss weights, target, text dropout)."""
    return FlowMatchingConfig(timestep_sampling=args.timestep_sampling, weighting_scheme=args.weighting_scheme,
                              logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
                              shift=args.timestep_shift, text_dropout=args.text_dropout,
                              precondition_outputs=args.precondition_outputs)


def effective_config(args) -> dict[str, Any]:
    """The run's configuration as printed at start and saved beside the checkpoints: ``config``,
    every declared field outside [model], and ``model`` (the checked model fields)."""
    out: dict[str, Any] = {"config": args.config}
    for section in SECTIONS.values():
        if section.name != "model":
            out.update((f.name, getattr(args, f.name)) for f in section.fields)
    out["model"] = dict(args.model)
    return json.loads(json.dumps(out, default=list))


def optional_kernels() -> str:
    """One line on Transformer Engine and apex, for the arguments block (megatron-core falls back
    to torch without them)."""
    from megatron_sd3.env import package_version  # the environment report's test of each

    te, apex = package_version("Transformer Engine") is not None, package_version("apex") is not None
    state = (f"Transformer Engine {'installed' if te else 'not installed'}, "
             f"apex {'installed' if apex else 'not installed'}")
    if not te and not apex:
        state += ": megatron-core uses torch's Adam, norms and multi-tensor ops"
    return state


__all__ = ["Section", "SECTIONS", "fields", "build_parser", "parse_args", "validate", "flow_config", "effective_config",
           "optional_kernels"]
