#!/usr/bin/env python
"""Convert between a diffusers SD3 transformer directory and a megatron_sd3 checkpoint.

    # diffusers (SD3 / SD3.5, save_pretrained layout) -> checkpoint, truncated to sd3_light's 15 blocks
    python tools/convert_diffusers_sd3.py to-megatron --diffusers SD35M/transformer --num-layers 15 --save ckpt
    # the same, written by a TP=2 x PP=2 layout (any layout reloads any checkpoint: blocks are keyed globally)
    torchrun --nproc-per-node 4 tools/convert_diffusers_sd3.py to-megatron ... \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    # checkpoint -> diffusers directory (SD3Transformer2DModel.from_pretrained loads it); --ema for the EMA weights
    python tools/convert_diffusers_sd3.py to-diffusers --load ckpt --output out/transformer

A converted checkpoint holds weights only: ``pretrain_sd3.py --load ckpt`` starts training from
them at iteration 0 (``--save`` elsewhere, or the same directory to continue there).
"""
import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_fields_of(model_config: dict) -> dict:
    """A checkpoint's saved model config -> ``make_config`` overrides."""
    return {k: v for k, v in model_config.items() if v is not None}


def to_megatron(a) -> int:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_sd3.config import config_to_dict, make_config
    from megatron_sd3.convert import (
        _load_diffusers_transformer, diffusers_to_full_state_dict, load_full_state_dict,
        model_overrides_from_diffusers)
    from megatron_sd3.distributed import destroy_distributed, initialize_distributed
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.parallel_layout import check_layout, pipeline_config_fields

    d = _load_diffusers_transformer(a.diffusers)
    fields = model_overrides_from_diffusers(dict(d.config), a.num_layers)
    if a.text_seq_len:
        fields["text_seq_len"] = a.text_seq_len
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise SystemExit(f"convert: error: run with TP x PP = {tp * pp} processes (torchrun), got {world}")
    check_layout(world, tp, pp, fields["num_layers"], fields["num_attention_heads"], fields["hidden_size"], 1, 1)
    initialize_distributed(tp, pp)
    cfg = make_config("tiny", parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                           **pipeline_config_fields(fields["num_layers"], pp)), **fields)
    model = SD3Model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_full_state_dict(model, diffusers_to_full_state_dict({k: v.float() for k, v in d.state_dict().items()}, cfg))
    path = ckpt.save_checkpoint(a.save, 0, [model], None, None, None, consumed_samples=0, skipped_iters=0,
                                model_config=config_to_dict(cfg), run_config=None)
    if torch.distributed.get_rank() == 0:
        print(f"wrote {path} ({cfg.num_layers} joint blocks, hidden {cfg.hidden_size}, TP {tp} x PP {pp})")
    destroy_distributed()
    return 0


def to_diffusers(a) -> int:
    from diffusers import SD3Transformer2DModel

    from megatron_sd3.config import make_config
    from megatron_sd3.convert import diffusers_config, ensure_single_process_parallel_state, sd3_to_diffusers_state_dict
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.ema import EMA

    d = ckpt.resolve_load(a.load, None)
    ensure_single_process_parallel_state()
    common = ckpt.load_common(d)
    cfg = make_config("tiny", **model_fields_of(common["model_config"]))
    model = SD3Model(cfg)
    if a.ema and not common.get("has_ema"):
        raise SystemExit(f"convert: error: {d} has no EMA weights; drop --ema")
    ema = EMA([model], 0.0) if a.ema else None
    ckpt.load_checkpoint(d, [model], None, ema, None, model_config=common["model_config"],
                         load_optim=False, load_rng=False)
    if ema is not None:
        ema.copy_to([model])
    out = SD3Transformer2DModel(**diffusers_config(cfg))
    out.load_state_dict(sd3_to_diffusers_state_dict(model), strict=True)
    out.save_pretrained(a.output)
    print(f"wrote {a.output} ({cfg.num_layers} joint blocks{', EMA weights' if a.ema else ''}, iteration "
          f"{common['iteration']})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("to-megatron", help="diffusers transformer directory -> checkpoint")
    m.add_argument("--diffusers", required=True, help="SD3Transformer2DModel directory (save_pretrained)")
    m.add_argument("--num-layers", type=int, default=None, help="keep the first N joint blocks (sd3_light: 15)")
    m.add_argument("--text-seq-len", type=int, default=None, help="text tokens of the training data (default 333)")
    m.add_argument("--save", required=True)
    m.add_argument("--tensor-model-parallel-size", type=int, default=1)
    m.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    x = sub.add_parser("to-diffusers", help="checkpoint -> diffusers transformer directory")
    x.add_argument("--load", required=True)
    x.add_argument("--output", required=True)
    x.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = p.parse_args(argv)
    from megatron_sd3.config import ConfigError
    from megatron_sd3.training.checkpointing import CheckpointError
    from megatron_sd3.training.parallel_layout import LayoutError

    try:
        return to_megatron(a) if a.cmd == "to-megatron" else to_diffusers(a)
    except (ConfigError, CheckpointError, LayoutError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # dist_checkpointing's writer spawns a manager: keep the guard
    sys.exit(main())
