"""Command line of ``pretrain_sd3.py``: Megatron-LM's flag names, a TOML preset underneath.

Precedence: built-in defaults < ``--config FILE.toml`` < flags given on the command line.

The TOML file has a ``[model]`` section (the seed's keys and the architecture, checked by
``megatron_sd3.config``) and any of the sections below, whose keys are the flags' names with
underscores (``[training] micro_batch_size = 2``). Unknown sections and keys, wrong types and
impossible values are one-line errors naming the key, before any work starts.
"""
from __future__ import annotations

import argparse
import difflib
import json
from typing import Any, Optional, Sequence

from megatron_sd3.config import MODEL_KEYS, ConfigError, check_model_fields, load_toml

# section -> flags it may hold (everything except [model], which config.py owns)
SECTIONS: dict[str, list[str]] = {
    "parallel": ["tensor_model_parallel_size", "pipeline_model_parallel_size", "pipeline_layers",
                 "num_virtual_stages_per_pipeline_rank",
                 "use_distributed_optimizer", "overlap_grad_reduce"],
    "training": ["micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr", "lr_warmup_iters",
                 "lr_decay_iters", "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                 "clip_grad", "seed", "bf16", "ema_decay", "ema_update_interval", "max_skipped_iters"],
    "flow": ["timestep_sampling", "logit_mean", "logit_std", "timestep_shift", "text_dropout"],
    "data": ["data_path", "mock_data", "mock_num_samples", "mock_latent_size", "mock_with_mask"],
    "checkpoint": ["save", "load", "save_interval", "exit_signal_handler", "exit_duration_in_mins",
                   "no_load_optim", "no_load_rng", "exit_interval", "ckpt_step", "async_save",
                   "distributed_timeout_minutes"],
    "logging": ["log_interval", "metrics_file", "tensorboard_dir", "no_progress"],
    "fp8": ["transformer_impl", "attention_backend", "torch_compile", "fp8_format", "fp8_recipe", "fp8_amax_history_len", "first_last_layers_bf16"],
}


def _kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_sd3.py",
        description="Pretrain sd3_light (SD3 MMDiT) with tensor, pipeline and data parallelism on "
                    "megatron-core. Flags override the --config TOML, which overrides the defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML preset ([model] plus [training], [parallel], ... sections)")

    m = p.add_argument_group("model (the TOML [model] section)")
    m.add_argument("--preset", default="tiny", help="base architecture: tiny, sd3_light, sd3_medium, sd35_medium, sd35_large")
    m.add_argument("--text-recon-gamma", type=float, default=None, help="weight of the text reconstruction loss; 0 = off")
    m.add_argument("--text-recon-target-layer", type=int, default=None,
                   help="0: text tokens after context_embedder; k: text output of joint block k")
    m.add_argument("--pseudo-huber-c", type=float, default=None, help="pseudo-Huber denoise loss constant (MSE when unset)")
    m.add_argument("--num-layers", type=int, default=None,
                   help="joint blocks: the preset's first N (its dual attention on those that remain)")
    m.add_argument("--hidden-size", type=int, default=None)
    m.add_argument("--num-attention-heads", type=int, default=None)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-layers", type=str, default=None,
                   help="blocks per pipeline stage, e.g. 8,7 (default: balanced)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved 1F1B: model chunks per pipeline rank (equal blocks per stage)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="megatron's distributed optimizer")
    g.add_argument("--overlap-grad-reduce", action="store_true")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    t.add_argument("--train-iters", type=int, default=100)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-iters", type=int, default=None, help="default: train-iters")
    t.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU; CPU runs stay fp32)")
    t.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights (0 = off)")
    t.add_argument("--ema-update-interval", type=int, default=1)
    t.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many NaN/Inf iterations in a row")

    f = p.add_argument_group("flow matching")
    f.add_argument("--timestep-sampling", default="logit_normal", choices=["logit_normal", "uniform"])
    f.add_argument("--logit-mean", type=float, default=0.0)
    f.add_argument("--logit-std", type=float, default=1.0)
    f.add_argument("--timestep-shift", type=float, default=1.0)
    f.add_argument("--text-dropout", type=float, default=0.0, help="probability of dropping the text (CFG)")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", default=None, help="dataset directory made by tools/preprocess_data.py")
    d.add_argument("--mock-data", action="store_true", help="deterministic synthetic data (as Megatron-LM)")
    d.add_argument("--mock-num-samples", type=int, default=100_000)
    d.add_argument("--mock-latent-size", type=str, default=None, help="HxW of mock latents, e.g. 32x32")
    d.add_argument("--mock-with-mask", action="store_true")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", default=None, help="checkpoint directory")
    c.add_argument("--load", default=None, help="checkpoint directory to resume from")
    c.add_argument("--save-interval", type=int, default=None)
    c.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM: save and exit 0")
    c.add_argument("--exit-duration-in-mins", type=float, default=None, help="save and exit after this long")
    c.add_argument("--no-load-optim", action="store_true")
    c.add_argument("--no-load-rng", action="store_true")
    # crash-safe resume (Megatron-LM's names; see megatron_sd3/training/checkpointing.py)
    c.add_argument("--exit-interval", type=int, default=None, help="save and exit at iteration N (a multiple of N)")
    c.add_argument("--ckpt-step", type=int, default=None, help="load iter_N of --load instead of the latest")
    c.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (dist_checkpointing's async save)")
    c.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="a collective or rendezvous waiting longer for a peer ends the rank with an error")

    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=10)
    lg.add_argument("--metrics-file", default=None, help="JSON lines of per-iteration figures")
    lg.add_argument("--tensorboard-dir", default=None)
    lg.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    q = p.add_argument_group("FP8 / backends")
    q.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    q.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused", "local"],
                   help="attention kernel (Megatron-LM's flag): flash = FlashAttention-2, fused = cuDNN, "
                        "unfused/local = plain math, auto = the framework's choice")
    q.add_argument("--torch-compile", action="store_true",
                   help="torch.compile each joint block (fuses the elementwise work around the GEMMs; "
                        "torchao FP8 needs it to be faster than bf16)")
    q.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"], help="FP8 GEMMs in the joint blocks")
    q.add_argument("--fp8-recipe", default=None, choices=["tensorwise", "delayed"],
                   help="default: delayed with transformer_engine, tensorwise with local (torchao)")
    q.add_argument("--fp8-amax-history-len", type=int, default=1)
    q.add_argument("--first-last-layers-bf16", action="store_true")
    return p


def _check_section(name: str, table: Any, allowed: list[str], parser, path) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    out = {}
    for key, value in table.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path} [{name}]: unknown key '{key}'{hint}; valid keys: {', '.join(allowed)}")
        action = next(a for a in parser._actions if a.dest == key)
        want = bool if isinstance(action, (argparse._StoreTrueAction,)) else (action.type or str)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not (isinstance(value, want) and (want is bool or not isinstance(value, bool))):
            raise ConfigError(f"{path} [{name}]: '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
        if action.choices and value not in action.choices:
            raise ConfigError(f"{path} [{name}]: '{key}' must be one of {list(action.choices)}, got {value!r}")
        out[key] = value
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults < TOML < command line; then ``validate``. Errors exit with a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # which flags the user actually typed: parse again with every default suppressed
    typed = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            kw = {"dest": a.dest, "default": argparse.SUPPRESS}
            if isinstance(a, argparse._StoreTrueAction):
                kw["action"] = "store_true"
            else:
                kw["type"] = a.type
            typed.add_argument(*a.option_strings, **kw)
    explicit = set(vars(typed.parse_known_args(argv)[0]))

    model_fields: dict[str, Any] = {}
    try:
        if args.config:
            data = load_toml(args.config)
            for section, table in data.items():
                if section == "model":
                    fields = check_model_fields(table, where=f"{args.config} [model]")
                    model_fields.update(fields)
                    continue
                if section not in SECTIONS:
                    close = difflib.get_close_matches(section, [*SECTIONS, "model"], n=1)
                    hint = f" (did you mean [{close[0]}]?)" if close else ""
                    raise ConfigError(f"{args.config}: unknown section [{section}]{hint}; "
                                      f"valid: model, {', '.join(SECTIONS)}")
                for key, value in _check_section(section, table, SECTIONS[section], parser, args.config).items():
                    if key not in explicit:
                        setattr(args, key, value)
        for key in ("preset", "text_recon_gamma", "text_recon_target_layer", "pseudo_huber_c",
                    "num_layers", "hidden_size", "num_attention_heads"):
            if key in explicit or (key == "preset" and "preset" not in model_fields):
                value = getattr(args, key)
                if value is not None:
                    model_fields[key] = value
        args.model = check_model_fields(model_fields, where="model")
        validate(args)
    except ConfigError as e:
        parser.exit(2, f"pretrain_sd3.py: error: {e}\n")
    return args


def validate(args) -> None:
    """Cross-flag rules that need no process group."""
    def bad(msg):
        raise ConfigError(msg)

    if args.train_iters < 1:
        bad(f"--train-iters must be >= 1, got {args.train_iters}")
    if args.micro_batch_size < 1:
        bad(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        bad(f"need 0 <= --min-lr <= --lr, got lr={args.lr} min_lr={args.min_lr}")
    if args.lr_warmup_iters < 0:
        bad(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters and args.lr_decay_style != "constant":
        bad(f"--lr-warmup-iters {args.lr_warmup_iters} must be < the decay length {decay_iters} "
            f"(--lr-decay-iters, default --train-iters); lower the warmup or set --lr-decay-iters")
    if not 0 <= args.ema_decay < 1:
        bad(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.ema_update_interval < 1 or args.log_interval < 1:
        bad("--ema-update-interval and --log-interval must be >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        bad(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.save_interval and not args.save:
        bad("--save-interval needs --save DIR")
    for flag in ("exit_interval", "distributed_timeout_minutes"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            bad(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.async_save and not args.save:
        bad("--async-save needs --save DIR")
    if args.exit_signal_handler and not args.save:
        bad("--exit-signal-handler saves on SIGTERM and needs --save DIR")
    if bool(args.data_path) == bool(args.mock_data):
        bad("give exactly one data source: --data-path DIR (tools/preprocess_data.py) or --mock-data")
    if args.mock_latent_size is not None:
        try:
            h, w = (int(v) for v in args.mock_latent_size.lower().split("x"))
            assert h > 0 and w > 0
        except Exception:
            bad(f"--mock-latent-size must look like 32x32, got {args.mock_latent_size!r}")
    if args.pipeline_layers is not None:
        try:
            args.pipeline_layers = [int(v) for v in str(args.pipeline_layers).split(",")]
        except ValueError:
            bad(f"--pipeline-layers must be comma-separated integers, got {args.pipeline_layers!r}")
    if args.fp8_recipe is None:
        args.fp8_recipe = "delayed" if args.transformer_impl == "transformer_engine" else "tensorwise"
    if args.fp8_format and args.transformer_impl == "local" and args.fp8_recipe == "delayed":
        bad("--fp8-recipe delayed needs --transformer-impl transformer_engine "
            "(torchao has no delayed scaling); use --fp8-recipe tensorwise")


def effective_config(args) -> dict[str, Any]:
    """The run's configuration as printed at start and saved beside the checkpoints."""
    model_flags = {"preset", "text_recon_gamma", "text_recon_target_layer", "pseudo_huber_c", "num_layers",
                   "hidden_size", "num_attention_heads"}  # their effective values are under "model"
    out = {k: v for k, v in vars(args).items() if k != "model" and k not in model_flags}
    out["model"] = dict(args.model)
    return json.loads(json.dumps(out, default=list))


__all__ = ["build_parser", "parse_args", "validate", "effective_config", "SECTIONS", "MODEL_KEYS"]
