"""Worker for tests/multiprocess/test_checkpoint_integrity.py: weights loaded without optimizer state reach
the bf16 optimizer's fp32 master copies (one process, CPU mode)."""
import sys

import torch


def main(tmp: str) -> None:
    from megatron_sd3.config import config_to_dict, make_config
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training.build import build_training

    initialize_distributed(1, 1, seed=1)
    par = dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    saved = build_training(make_config("tiny", num_layers=2, init_seed=1, parallel=dict(par)), optimizer=dict(lr=1e-3))
    ckpt.save_checkpoint(tmp, 1, saved.models, None, None, None, consumed_samples=0, skipped_iters=0,
                         model_config=config_to_dict(saved.cfg), run_config={}, global_batch_size=1)
    run = build_training(make_config("tiny", num_layers=2, init_seed=2, parallel=dict(par)), optimizer=dict(lr=1e-3))
    ckpt.load_checkpoint(ckpt.resolve_load(tmp, None), run.models, run.optimizer, None, None,
                         model_config=config_to_dict(run.cfg), load_optim=False, load_rng=False)
    opt = run.optimizer.chained_optimizers[0] if hasattr(run.optimizer, "chained_optimizers") else run.optimizer
    pairs = [(m, f) for gm, gf in zip(opt.float16_groups, opt.fp32_from_float16_groups) for m, f in zip(gm, gf)]
    assert pairs, "no bf16 parameters with fp32 masters"
    worst = max(float((m.detach().float() - f).abs().max()) for m, f in pairs)
    assert worst == 0.0, f"fp32 masters differ from the loaded weights by {worst}"
    print("masters equal the loaded weights")


if __name__ == "__main__":
    main(sys.argv[1])
