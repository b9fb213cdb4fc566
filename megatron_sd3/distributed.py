"""Distributed bootstrap: torch.distributed + megatron-core parallel_state + RNG seeding.

- ``initialize_distributed(tp, pp, vpp=None, seed=1234, backend=None, cp=1)``: reads the torchrun
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without
  it, makes a one-process group on a free local TCP port. Picks nccl + CUDA when CUDA is available,
  otherwise gloo + :mod:`megatron_sd3.testing.cpu_mode`. Then ``parallel_state.initialize_model_parallel``
  and seeding (megatron's ``model_parallel_cuda_manual_seed`` on GPU, its CPU equivalent on CPU).
- ``destroy_distributed()``: undo it (tests run several layouts in one process).
- The layout rules themselves live in ``megatron_sd3.training.parallel_layout.check_layout``.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "initialize_distributed",
    "destroy_distributed",
    "set_seed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int]
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device
    cpu_mode: bool
    cp: int = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and the megatron tensor-parallel RNG tracker.

    Same as Megatron-LM's ``_set_random_seed`` except that no pipeline-rank offset is added: the
    model seeds its initialisation per global layer and the data draws per sample, and the
    default generator must not depend on the layout (docs/design.md, section "Layout-independent randomness").
    Needs parallel_state to be initialised (the tracker seeds from the TP/EP rank).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        from megatron_sd3.testing import cpu_mode

        cpu_mode.cpu_model_parallel_manual_seed(seed)


def initialize_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: float = 10,
    watch_parent: Optional[bool] = None,
    cp: int = 1,
    **model_parallel_kwargs,
) -> DistInfo:
    """Initialise torch.distributed, megatron parallel_state and the RNGs; return a DistInfo.

    backend: None picks nccl when CUDA is available, gloo otherwise. gloo without CUDA turns on
    :func:`megatron_sd3.testing.cpu_mode.enable_cpu_mode`. Extra keyword arguments go to
    ``parallel_state.initialize_model_parallel``. If torch.distributed is already initialised
    (e.g. by the caller), that group is used as is.

    No rank outlives its job: ``timeout_minutes`` (``--distributed-timeout-minutes``) bounds every
    collective and the rendezvous, so a hung or dead peer ends the rank with an error; and
    ``watch_parent`` (default: when started by a launcher, see
    :func:`megatron_sd3.training.watchdog.launched_by_launcher`) stops the rank when its
    launcher dies. Every process the rank forks afterwards dies with it
    (:func:`megatron_sd3.training.watchdog.forked_children_die_with_parent`).
    """
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, which is not available; use gloo")
    cpu_mode = not cuda
    if cpu_mode:
        from megatron_sd3.testing import cpu_mode as _cpu_mode

        _cpu_mode.enable_cpu_mode()

    from megatron_sd3.training import watchdog

    watchdog.forked_children_die_with_parent()
    if watch_parent if watch_parent is not None else watchdog.launched_by_launcher():
        watchdog.watch_parent()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")

    world_size = dist.get_world_size()
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor parallel x pipeline parallel x context "
            f"parallel = {tp} x {pp} x {cp} = {tp * pp * cp}; choose sizes whose product divides the "
            f"number of processes"
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
        **model_parallel_kwargs,
    )
    set_seed(seed)

    return DistInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        vpp=vpp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=backend,
        device=device,
        cpu_mode=cpu_mode,
        cp=cp,
    )


def destroy_distributed() -> None:
    """Tear down parallel_state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
