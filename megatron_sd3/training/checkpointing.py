"""Checkpoints on megatron-core ``dist_checkpointing``: crash at any moment, run the same command again.

Layout of ``--save DIR`` (Megatron-LM's names)::

    DIR/iter_0000010/               one dist_checkpointing directory per saved iteration
    DIR/iter_0000010/integrity.json every file of the checkpoint with its size and sha256
    DIR/latest_checkpointed_iteration.txt
    DIR/effective_config.json       the run's configuration

A save (docs/design.md, section "Checkpoints"):

1. rank 0 removes what interrupted saves left (``iter_*.tmp/``, and ``iter_*`` directories newer
   than the one ``latest`` names) and makes ``iter_XXXXXXX.tmp/``;
2. every rank writes its shards there (``dist_checkpointing.save``; with ``--async-save`` in a
   forked writer, megatron-core's ``AsyncCallsQueue``, while training goes on);
3. finalisation, on all ranks once every writer is done (inline, or from the queue like
   Megatron-LM's ``maybe_finalize_async_save``): the files are checksummed (spread over the
   ranks) into ``integrity.json``, rank 0 renames ``.tmp`` to ``iter_XXXXXXX/`` and only then
   replaces ``latest`` atomically (write, fsync, ``os.replace``).

So ``latest`` only ever names a complete, recorded checkpoint; a crash at any point leaves it on
the previous one (or absent: the run then starts fresh and says so). A directory ``latest`` does
not name is never loaded. Loading checks every recorded file's size before anything is read
(preflight, one line naming the file and the newest good checkpoint) and its checksum before
the state is loaded (spread over the ranks). ``--ckpt-step N`` loads ``iter_N`` instead.

What is saved: the model (``sharded_state_dict``, blocks keyed by global index so any TP/PP
layout reloads it), the optimizer (reshardable), the EMA weights (sharded like the model),
and as common state the iteration, consumed samples, global batch size, LR scheduler,
skipped-iteration count and the model configuration (checked on load: a mismatch names the
differing keys), plus per-rank RNG states (skipped, with a note, when the layout changed).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_sd3 import compat

LATEST = "latest_checkpointed_iteration.txt"
INTEGRITY = "integrity.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Megatron-LM's metadata for reshardable optimizer state (non-distributed and distributed).
METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A missing, partial or mismatched checkpoint; the message says what and how to fix it."""


class SaveError(CheckpointError):
    """A save that failed; the previous complete checkpoint stays the one ``latest`` names.
    ``quiet``: this rank only learnt that a write failed elsewhere (megatron-core raises the
    details on its coordinator, rank 0, which says them)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def serial_collectives(fn):
    """Run ``fn`` with one intra-op thread (CPU runs with more than one; a no-op otherwise).

    A checkpoint's object collectives (megatron-core's and torch DCP's ``all_gather_object`` /
    ``gather_object`` of the save and load plans) copy their payloads on gloo's own worker threads.
    A copy above ATen's grain size starts an OpenMP team on such a thread, and that team lives as
    long as the process group. libgomp then sees more OpenMP threads than cores and makes every
    team's workers sleep almost at once between parallel regions: on 2 cores, every later
    iteration of a CPU run takes about twice as long after the first save or load. With one
    intra-op thread while the collectives run, a gloo thread's OpenMP thread count is initialised
    to 1 and it never starts a team. Saving and loading are I/O-bound, so little is lost."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _iterations(root: Path) -> list[int]:
    """Iterations of the finished (renamed) ``iter_XXXXXXX`` directories, newest first."""
    found = [int(m.group(1)) for p in root.glob("iter_*") if (m := _ITER_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _fsync_write(path: Path, text: str) -> None:
    """Write ``path`` atomically and durably: a temporary file, fsync, ``os.replace``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


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


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != INTEGRITY)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _spread(items: list, fn) -> dict:
    """``{item: fn(item)}`` with the work spread over the ranks (item i on rank i % world); all
    ranks get the whole dict."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {it: fn(it) for i, it in enumerate(items) if i % world == rank}
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _record_integrity(tmp: Path, iteration: int) -> None:
    """All ranks: checksum the checkpoint's files; rank 0 writes ``integrity.json``."""
    names = [_files(tmp) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing, whatever each rank's view of the folder
    sums = _spread(names[0], lambda f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)})
    if dist.get_rank() == 0:
        _fsync_write(tmp / INTEGRITY, json.dumps({"iteration": iteration, "files": sums}, indent=1, sort_keys=True))


def _read_integrity(d: Path) -> Optional[dict]:
    f = d / INTEGRITY
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return {INTEGRITY: {"size": -1, "sha256": ""}}  # reported as a damaged file below


def size_problem(d: Path) -> Optional[str]:
    """What is wrong with ``d``'s files by their recorded sizes (no data read), or None."""
    if not (d / "metadata.json").is_file() or not (d / "common.pt").is_file():
        return f"{d.name}/ is incomplete (metadata.json or common.pt missing)"
    record = _read_integrity(d)
    if record is None:
        return None  # written before checkpoints were recorded: nothing to compare with
    for name, rec in sorted(record.items()):
        p = d / name
        if name == INTEGRITY:
            return f"{d.name}/{INTEGRITY} is unreadable"
        if not p.is_file():
            return f"{d.name}/{name} is missing"
        size = p.stat().st_size
        if size != rec["size"]:
            return f"{d.name}/{name} is {size} bytes, {rec['size']} were written (truncated or overwritten)"
    return None


def newest_good(root: Path, below: Optional[int] = None) -> Optional[int]:
    """The newest ``iter_*`` of ``root`` (below iteration ``below``) whose files are all there with
    their recorded sizes."""
    for it in _iterations(root):
        if (below is None or it < below) and _read_integrity(iter_dir(root, it)) is not None \
                and size_problem(iter_dir(root, it)) is None:
            return it
    return None


def _good_hint(root: Path, below: Optional[int]) -> str:
    good = newest_good(root, below)
    if good is None:
        return "no older complete checkpoint is there: drop --load to start from scratch"
    return f"the newest good checkpoint there is iteration {good}: load it with --ckpt-step {good}"


def _verify_checksums(d: Path) -> None:
    """All ranks (collective): compare every recorded file's sha256, one line naming the first bad one."""
    record = _read_integrity(d)
    if record is None:
        if dist.get_rank() == 0:
            print(f" > {d}: no {INTEGRITY} (written by an older version): files not verified", flush=True)
        return
    got = _spread(sorted(record), lambda f: _sha256(d / f) if (d / f).is_file() else None)
    bad = [f for f in sorted(record) if got[f] != record[f]["sha256"]]
    if bad:
        m = _ITER_RE.match(d.name)
        raise CheckpointError(f"--load {d}: {bad[0]} does not match its recorded checksum (corrupt)"
                              f"{f' and {len(bad) - 1} more files' if len(bad) > 1 else ''}; "
                              f"{_good_hint(d.parent, int(m.group(1)) if m else None)}")


class _WriterErrorLines(logging.Filter):
    """megatron-core's writer logs each worker's error on every rank ("Local process N encountered
    an error: ..."), then raises it: :func:`save_failed` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Local process ")


logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").addFilter(_WriterErrorLines())


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def _says_no_space(e: BaseException) -> bool:
    """ENOSPC anywhere in the error: its chain, or (megatron-core gathers the writers' errors as
    text) its message and the failures it carries."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        texts = [str(e)] + [str(f[0] if isinstance(f, tuple) else f)
                            for f in (getattr(e, "failures", None) or {}).values()]
        if any("No space left on device" in t or "[Errno 28]" in t for t in texts):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_error_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None) or {}
    for rank, f in sorted(failures.items()):
        exc = f[0] if isinstance(f, tuple) else f
        return f"rank {rank}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return _first_line(e)


def save_failed(root: Path, iteration: int, e: BaseException) -> SaveError:
    """The one error of a failed save. Rank 0 removes what the save left (``iter_*.tmp``, or an
    ``iter_*`` folder ``latest`` does not name yet), then measures: the space the save needed
    (the size of the last complete checkpoint) against the space free."""
    if dist.get_rank() != 0 and isinstance(e, CheckpointException) and not e.failures:
        return SaveError("a checkpoint write failed on another rank", quiet=True)
    root = Path(root)
    final, tmp = iter_dir(root, iteration), Path(str(iter_dir(root, iteration)) + ".tmp")
    latest = read_latest(root) if root.is_dir() else None
    written = _dir_bytes(tmp)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if latest != iteration:
            shutil.rmtree(final, ignore_errors=True)
    needed = _dir_bytes(iter_dir(root, latest)) if latest is not None else None
    free = shutil.disk_usage(root).free if root.is_dir() else None
    kept = (f"iteration {latest} (in {root}) stays the latest checkpoint" if latest is not None
            else f"{root} holds no complete checkpoint yet")
    if _says_no_space(e) or (needed is not None and free is not None and free < needed):
        need = (f"{needed} bytes, the size of the last checkpoint" if needed is not None
                else f"more than the {written} bytes written before it failed")
        return SaveError(f"saving iteration {iteration} to {root} failed: no space left on the device "
                         f"(it needs {need}; {free} bytes free); {kept}. Free space or give --save a larger "
                         f"disk, then run the same command to resume")
    return SaveError(f"saving iteration {iteration} to {root} failed ({_first_error_line(e)}); {kept}; "
                     f"run the same command to resume from it")


@contextlib.contextmanager
def _save_errors(root: Path, iteration: int):
    """Any error of the save of ``iteration`` becomes :func:`save_failed`'s one error; a peer rank
    that died is left as it is (that rank says why)."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        from megatron_sd3.training.watchdog import peer_failure

        if isinstance(e, Exception) and peer_failure(e):
            raise
        raise save_failed(root, iteration, e) from None


def _cleanup_interrupted(root: Path) -> None:
    """Rank 0, before a save: what interrupted saves left (``*.tmp`` folders, iterations newer than
    ``latest``, which no resume loads) goes."""
    latest = read_latest(root)
    for p in root.glob("iter_*"):
        m = _ITER_RE.match(p.name)
        if p.is_dir() and (p.name.endswith(".tmp") or (m and (latest is None or int(m.group(1)) > latest))):
            print(f" > removing {p.name}/ (left by an interrupted save)", flush=True)
            shutil.rmtree(p, ignore_errors=True)


def _finalize_save(root: Path, iteration: int, tmp: Path, final: Path, run_config: dict) -> None:
    """All ranks, once every shard is written: record, rename, then move ``latest``."""
    _record_integrity(tmp, iteration)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            if read_latest(root) == iteration:  # never leave ``latest`` naming a folder being replaced
                older = newest_good(root, iteration)
                if older is None:
                    (root / LATEST).unlink()
                else:
                    _fsync_write(root / LATEST, str(older))
            shutil.rmtree(final)
        os.replace(tmp, final)
        if run_config:
            (root / "effective_config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
        _fsync_write(root / LATEST, str(iteration))  # the pointer moves only after a complete write
        print(f" > saved checkpoint {final}", flush=True)
    dist.barrier()


class AsyncSaver:
    """``--async-save``: megatron-core's ``AsyncCallsQueue`` (forked writers), finalised as in
    Megatron-LM: ``maybe_finalize(blocking=False)`` once per iteration, ``blocking=True`` before the
    next save and at the end. A save counts only once finalised (then ``latest`` moves)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.in_flight: Optional[tuple[Path, int]] = None  # (root, iteration) of the save being written

    def schedule(self, request, root: Path, iteration: int) -> None:
        # the forked writer dies with its rank (watchdog.forked_children_die_with_parent)
        self.in_flight = (Path(root), iteration)
        self.queue.schedule_async_request(request)

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Finalise the save once its writer is done (every rank agrees when); a failed write
        raises :class:`SaveError` (see :func:`save_failed`)."""
        if self.queue.get_num_unfinalized_calls():
            self._finalize(blocking)

    @serial_collectives
    def _finalize(self, blocking: bool) -> None:
        with _save_errors(*self.in_flight):
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()


@serial_collectives
def save_checkpoint(root: str | Path, iteration: int, model_chunks, optimizer, ema, scheduler, *,
                    consumed_samples: int, skipped_iters: int, model_config: dict, run_config: dict,
                    global_batch_size: Optional[int] = None, async_saver: Optional[AsyncSaver] = None,
                    data_blend: Optional[list] = None) -> Path:
    """A complete training checkpoint (``optimizer=None``: weights only, e.g. converted weights).
    With ``async_saver`` the files are written in the background and the checkpoint counts (in
    ``latest``) once ``async_saver.maybe_finalize`` has finalised it."""
    root = Path(root)
    final, tmp = iter_dir(root, iteration), Path(str(iter_dir(root, iteration)) + ".tmp")
    if async_saver is not None:
        async_saver.maybe_finalize(blocking=True)  # one save in flight at a time (as Megatron-LM)
    rank0 = dist.get_rank() == 0
    with _save_errors(root, iteration):
        if rank0:
            root.mkdir(parents=True, exist_ok=True)
            _cleanup_interrupted(root)
            tmp.mkdir()
        dist.barrier()
        weights_only = optimizer is None
        common = {"iteration": iteration, "consumed_samples": consumed_samples, "skipped_iters": skipped_iters,
                  "global_batch_size": global_batch_size, "data_blend": data_blend,
                  "scheduler": None if weights_only else scheduler.state_dict(), "model_config": model_config,
                  "layout": _layout(), "weights_only": weights_only, "has_ema": ema is not None}
        state = _state_dict(model_chunks, optimizer, ema, common, None if weights_only else _rng_state(),
                            loading=False, with_optim=not weights_only)
        finalize = functools.partial(_finalize_save, root, iteration, tmp, final, run_config)
        compat.checkpoint_writer_results_queue()  # its server process must not outlive this rank
        request = dist_checkpointing.save(state, str(tmp), content_metadata=METADATA,
                                          async_sharded_save=async_saver is not None)
        if request is None:
            finalize()
    if request is not None:
        request.add_finalize_fn(finalize)
        async_saver.schedule(request, root, iteration)
    return final


def fresh_start_note(load: str) -> str:
    """The one line a run prints when ``--load`` (== ``--save``) has no complete checkpoint."""
    root = Path(load)
    partial = sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []
    if not partial:
        return f"no checkpoint in {load} yet: starting from scratch"
    return (f"no complete checkpoint in {load} (ignoring {', '.join(partial)} of an interrupted save, "
            f"removed by the next save): starting from scratch")


def resolve_load(load: Optional[str], save: Optional[str], ckpt_step: Optional[int] = None) -> Optional[Path]:
    """The checkpoint directory to resume from, or None to start fresh (with --load == --save and
    no complete save yet: Megatron-LM's resume-if-present idiom). Everything else wrong is an error.
    Reads no checkpoint data (file sizes only): it runs before the process group exists."""
    if not load:
        if ckpt_step is not None:
            raise CheckpointError("--ckpt-step needs --load DIR")
        return None
    root = Path(load)
    same_as_save = save is not None and Path(save).resolve() == root.resolve()
    if ckpt_step is not None:
        d = iter_dir(root, ckpt_step)
        if not d.is_dir():
            have = _iterations(root) if root.is_dir() else []
            raise CheckpointError(f"--ckpt-step {ckpt_step}: no {d.name}/ in {root} (saved iterations: "
                                  f"{', '.join(map(str, sorted(have))) or 'none'})")
        problem = size_problem(d)
        if problem:
            raise CheckpointError(f"--load {root} --ckpt-step {ckpt_step}: {problem}; {_good_hint(root, ckpt_step)}")
        return d
    iteration = read_latest(root) if root.is_dir() else None
    if iteration is None:
        if same_as_save:
            return None  # nothing complete yet; whatever an interrupted save left is ignored
        if not root.exists() or not any(root.glob("iter_*")):
            raise CheckpointError(f"--load {root}: no checkpoint there (no {LATEST}); check the path, or drop "
                                  f"--load to start from scratch")
        raise CheckpointError(f"--load {root}: no {LATEST}, so no save there completed; point --load at a "
                              f"complete checkpoint, or use --save {root} --load {root} to start fresh and "
                              f"save there")
    d = iter_dir(root, iteration)
    if not d.is_dir():
        raise CheckpointError(f"--load {root}: {LATEST} says iteration {iteration} but {d.name}/ is missing; "
                              f"{_good_hint(root, iteration)}")
    problem = size_problem(d)
    if problem:
        raise CheckpointError(f"--load {root}: {problem}; {_good_hint(root, iteration)}")
    return d


def load_common(ckpt: Path) -> dict:
    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt))["common"]
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"--load {ckpt}: cannot read common.pt: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def check_model_config(saved: dict, current: dict, ckpt: Path) -> None:
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}" for k in keys
            if k not in ("text_recon_gamma", "text_recon_target_layer", "pseudo_huber_c", "zero_init_adaln",
                         "init_seed")
            and saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"--load {ckpt}: model does not match the checkpoint ({'; '.join(diff)}); "
                              f"use the checkpoint's [model] settings")


def check_resume(common: dict, model_config: dict, ckpt: Path, *, load_optim: bool,
                 global_batch_size: Optional[int]) -> None:
    """What a resume can and cannot change (docs/design.md, section "Resume"), said in one line."""
    if common.get("weights_only"):
        return
    g_saved = float(common["model_config"].get("text_recon_gamma") or 0.0)
    g_run = float(model_config.get("text_recon_gamma") or 0.0)
    if load_optim and (g_saved > 0) != (g_run > 0) and not model_config.get("context_pre_only_last", False):
        why = ("the last block's text-stream weights were frozen (gamma 0), so it has no optimizer state "
               "for them" if g_saved == 0 else
               "it holds optimizer state for the last block's text-stream weights, which gamma 0 freezes")
        raise CheckpointError(f"--load {ckpt}: the checkpoint was trained with text_recon_gamma {g_saved:g} and "
                              f"this run asks for {g_run:g}: {why}; resume with --text-recon-gamma "
                              f"{g_saved:g}, or switch with --no-load-optim (its weights, a fresh optimizer)")
    it, consumed = common["iteration"], common["consumed_samples"]
    g_ckpt = common.get("global_batch_size") or (consumed // it if it else None)
    if global_batch_size is not None and g_ckpt and g_ckpt != global_batch_size:
        raise CheckpointError(f"--load {ckpt}: the checkpoint was trained with --global-batch-size {g_ckpt} and "
                              f"this run asks for {global_batch_size}: the data order is keyed by the global "
                              f"batch size, so samples of the epoch would repeat or be skipped; resume with "
                              f"--global-batch-size {g_ckpt}")


@serial_collectives
def load_checkpoint(ckpt: Path, model_chunks, optimizer, ema, scheduler, *, model_config: dict,
                    load_optim: bool = True, load_rng: bool = True,
                    global_batch_size: Optional[int] = None) -> dict:
    """Restore in place; returns the common state (iteration, consumed samples, ...). Collective."""
    _verify_checksums(ckpt)
    common = load_common(ckpt)
    check_model_config(common["model_config"], model_config, ckpt)
    check_resume(common, model_config, ckpt, load_optim=load_optim, global_batch_size=global_batch_size)
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
    except (Exception, CheckpointException) as e:  # one line instead of a wall of megatron internals
        raise CheckpointError(f"--load {ckpt}: cannot read the checkpoint: {_first_line(e)}") from e
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
    elif optimizer is not None:
        # weights without optimizer state (--no-load-optim, converted weights): the fp32 master
        # copies of bf16 parameters must take the loaded weights, or the first step would write
        # the old masters back (what Megatron-LM does in this case)
        optimizer.reload_model_params()
    if ema is not None:
        if has_ema:
            for i in range(n):
                ema.load_sharded(loaded[_chunk_key(i, n, "ema")], chunk=i)
        else:  # weights-only checkpoint: the average starts from the loaded weights
            ema.reset()
    if use_rng:
        _set_rng_state(loaded["rng_state"])
    return common
