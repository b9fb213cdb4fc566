"""Checkpoints on megatron-core ``dist_checkpointing``, written so a crash never damages the last good one.

Layout of ``--save DIR`` (Megatron-LM's names)::

    DIR/iter_0000010/               one dist_checkpointing directory per saved iteration
    DIR/latest_checkpointed_iteration.txt
    DIR/effective_config.json       the run's configuration

A save writes ``iter_XXXXXXX.tmp/`` on all ranks, then (after a barrier) rank 0 renames it to
``iter_XXXXXXX/`` and only then replaces the ``latest`` file atomically (write + ``os.replace``).
A crash at any point leaves ``latest`` pointing at the previous complete checkpoint.

What is saved: the model (``sharded_state_dict``, blocks keyed by global index so any TP/PP
layout reloads it), the optimizer (reshardable), the EMA weights (sharded like the model),
and as common state the iteration, consumed samples, LR scheduler, skipped-iteration count and
the model configuration (checked on load: a mismatch names the differing keys), plus per-rank
RNG states (skipped, with a note, when the layout changed).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

LATEST = "latest_checkpointed_iteration.txt"
# Megatron-LM's metadata for reshardable optimizer state (non-distributed and distributed).
METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A missing, partial or mismatched checkpoint; the message says what and how to fix it."""


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest(root: str | Path) -> Optional[int]:
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{f} is corrupt (content {text[:40]!r}); it should hold an iteration number")
    return int(text)


def _rng_state() -> dict:
    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _layout() -> tuple[int, int, int]:
    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size())


def _rng_sharded(state) -> ShardedObject:
    pp, tp, _ = _layout()
    return ShardedObject("rng_state", state, (pp, tp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def _chunk_key(i: int, n: int, name: str) -> str:
    return name if n == 1 else f"{name}{i}"  # Megatron-LM: "model" or "model0", "model1", ...


def _state_dict(model_chunks, optimizer, ema, common: dict, rng, *, loading: bool, with_optim: bool):
    n = len(model_chunks)
    model_sds = [c.sharded_state_dict(metadata=dict(METADATA)) for c in model_chunks]
    state: dict[str, Any] = {_chunk_key(i, n, "model"): sd for i, sd in enumerate(model_sds)}
    if with_optim:
        models = model_sds[0] if n == 1 else dict(state)  # Megatron-LM passes {"model0": ..., ...}
        state["optimizer"] = optimizer.sharded_state_dict(models, is_loading=loading, metadata=METADATA)
    if ema is not None:
        for i, sd in enumerate(model_sds):
            state[_chunk_key(i, n, "ema")] = ema.sharded_state_dict(sd, chunk=i)
    state["common"] = common
    if rng is not None:
        state["rng_state"] = _rng_sharded(rng)
    return state


def save_checkpoint(root: str | Path, iteration: int, model_chunks, optimizer, ema, scheduler, *,
                    consumed_samples: int, skipped_iters: int, model_config: dict, run_config: dict) -> Path:
    """A complete training checkpoint (``optimizer=None``: weights only, e.g. converted weights)."""
    root = Path(root)
    final, tmp = iter_dir(root, iteration), Path(str(iter_dir(root, iteration)) + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of an interrupted save of the same iteration
        tmp.mkdir()
    dist.barrier()
    weights_only = optimizer is None
    common = {"iteration": iteration, "consumed_samples": consumed_samples, "skipped_iters": skipped_iters,
              "scheduler": None if weights_only else scheduler.state_dict(), "model_config": model_config,
              "layout": _layout(), "weights_only": weights_only, "has_ema": ema is not None}
    state = _state_dict(model_chunks, optimizer, ema, common, None if weights_only else _rng_state(),
                        loading=False, with_optim=not weights_only)
    dist_checkpointing.save(state, str(tmp), content_metadata=METADATA)
    dist.barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if run_config:
            (root / "effective_config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
        tmp_latest = root / (LATEST + ".tmp")
        tmp_latest.write_text(str(iteration))
        os.replace(tmp_latest, root / LATEST)  # the pointer moves only after a complete write
    dist.barrier()
    return final


def resolve_load(load: Optional[str], save: Optional[str]) -> Optional[Path]:
    """The checkpoint directory to resume from, or None to start fresh (with --load == --save and
    nothing saved yet: Megatron-LM's resume-if-present idiom). Everything else wrong is an error."""
    if not load:
        return None
    root = Path(load)
    same_as_save = save is not None and Path(save).resolve() == root.resolve()
    if not root.exists() or (root.is_dir() and read_latest(root) is None and not any(root.glob("iter_*"))):
        if same_as_save:
            return None
        raise CheckpointError(f"--load {root}: no checkpoint there (no {LATEST}); check the path, or drop "
                              f"--load to start from scratch")
    iteration = read_latest(root)
    if iteration is None:
        raise CheckpointError(f"--load {root}: has iter_* directories but no {LATEST}, so no save completed; "
                              f"remove the partial iter_*.tmp directories or point --load elsewhere")
    d = iter_dir(root, iteration)
    if not d.is_dir():
        raise CheckpointError(f"--load {root}: {LATEST} says iteration {iteration} but {d.name}/ is missing")
    if not (d / "metadata.json").is_file() or not (d / "common.pt").is_file():
        raise CheckpointError(f"--load {d}: checkpoint is incomplete (metadata.json or common.pt missing)")
    return d


def load_common(ckpt: Path) -> dict:
    return dist_checkpointing.load_common_state_dict(str(ckpt))["common"]


def check_model_config(saved: dict, current: dict, ckpt: Path) -> None:
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}" for k in keys
            if k not in ("text_recon_gamma", "text_recon_target_layer", "pseudo_huber_c", "zero_init_adaln",
                         "init_seed")
            and saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"--load {ckpt}: model does not match the checkpoint ({'; '.join(diff)}); "
                              f"use the checkpoint's [model] settings")


def load_checkpoint(ckpt: Path, model_chunks, optimizer, ema, scheduler, *, model_config: dict,
                    load_optim: bool = True, load_rng: bool = True) -> dict:
    """Restore in place; returns the common state (iteration, consumed samples, ...)."""
    common = load_common(ckpt)
    check_model_config(common["model_config"], model_config, ckpt)
    if common.get("weights_only"):  # converted weights: start training from them at iteration 0
        load_optim = load_rng = False
    same_layout = tuple(common.get("layout", ())) == _layout()
    use_rng = load_rng and same_layout
    if load_rng and not same_layout and dist.get_rank() == 0:
        print(f" > checkpoint layout (pp, tp, dp) {tuple(common['layout'])} differs from this run's "
              f"{_layout()}: model and optimizer are resharded, RNG states are not restored", flush=True)
    has_ema = ema is not None and common.get("has_ema", False)
    template = _state_dict(model_chunks, optimizer, ema if has_ema else None, common,
                           _rng_state() if use_rng else None, loading=True, with_optim=load_optim)
    template.pop("common")
    try:
        loaded = dist_checkpointing.load(template, str(ckpt), strict="assume_ok_unexpected")
    except Exception as e:  # a one-line reason instead of a wall of megatron internals
        raise CheckpointError(f"--load {ckpt}: cannot read the checkpoint: {str(e).splitlines()[0][:300]}") from e
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        missing, _ = chunk.load_state_dict(loaded[_chunk_key(i, n, "model")], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"--load {ckpt}: weights missing for {missing[:3]} "
                                  f"(and {max(0, len(missing) - 3)} more)")
    if load_optim:
        with torch.no_grad():  # the optimizer copies into views of (fp32) model weights
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
    if ema is not None:
        if has_ema:
            for i in range(n):
                ema.load_sharded(loaded[_chunk_key(i, n, "ema")], chunk=i)
        else:  # weights-only checkpoint: the average starts from the loaded weights
            ema.reset()
    if use_rng:
        _set_rng_state(loaded["rng_state"])
    return common
