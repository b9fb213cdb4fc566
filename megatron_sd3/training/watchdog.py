"""No rank outlives its job: a parent-death watch for launched ranks.

A rank started by a launcher (torchrun, or any launcher that sets ``WORLD_SIZE`` > 1) must not
keep running, or keep waiting in a collective, once that launcher is gone. ``watch_parent()``:

1. asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, through ctypes) to send SIGTERM
   when the parent dies: the rank stops at once, or with ``--exit-signal-handler`` saves at the
   end of the iteration and exits;
2. starts a daemon thread that polls ``os.getppid()`` every second (the portable fallback, and the
   guard for a parent that died before step 1): when the parent is gone it sends SIGTERM itself
   and, if the process is still alive ``grace_s`` seconds later (a save that cannot complete, a
   collective with a dead peer), SIGKILLs it.

A peer that died or hangs is the other half: every collective then fails (gloo: connection
closed) or times out after ``--distributed-timeout-minutes`` (the process-group timeout given to
``torch.distributed.init_process_group`` and megatron's ``initialize_model_parallel``).

``forked_children_die_with_parent()`` covers every process a rank forks, whoever forks it
(megatron-core's checkpoint writer workers, the asynchronous writer, data loader workers, code we
do not own): an ``os.register_at_fork`` hook, run in each forked child, asks for SIGKILL when the
forking process dies, so a child blocked forever (a queue read, a lock) cannot outlive its rank,
however the rank dies, ``kill -9`` included (docs/design.md, "No process outlives its rank").
``die_with_parent()`` is the kernel request alone; ``helper_dies_with_parent()`` is the same for a
helper the rank *spawns* through ``multiprocessing`` (megatron-core's checkpoint write-results
server, see ``compat.checkpoint_writer_results_queue``), which no fork hook reaches.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1
GRACE_S = 30.0  # like torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT: SIGTERM, then SIGKILL

_thread: Optional[threading.Thread] = None


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Linux: the kernel sends ``sig`` to this process when its parent exits. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except OSError:
        return False


def helper_dies_with_parent() -> None:
    """In a ``multiprocessing`` child: SIGTERM when the parent exits, and exit now if it already
    has (it may die between the fork and the ``prctl``)."""
    import multiprocessing

    die_with_parent(signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


_FORKER = {"pid": 0, "main_thread": True}  # set in the parent just before each fork
_fork_hook = False


def _before_fork() -> None:
    _FORKER["pid"] = os.getpid()
    _FORKER["main_thread"] = threading.current_thread() is threading.main_thread()


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_child() -> None:
    parent = _FORKER["pid"]
    if _FORKER["main_thread"]:
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os._exit(1)
    else:
        # The kernel's parent-death signal follows the forking *thread*: a helper thread that
        # forks and then ends would kill a healthy child. Such a child polls for its parent.
        threading.Thread(target=_poll_parent, args=(parent,), name="parent-poll", daemon=True).start()


def forked_children_die_with_parent() -> None:
    """From now on, every child this process (or any child of it) forks is SIGKILLed when its
    parent dies. Idempotent; a no-op off Linux. ``subprocess`` children (fork + exec of another
    program) do not run Python's fork hooks and are not covered."""
    global _fork_hook
    if _fork_hook or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _fork_hook = True


def launched_by_launcher(env=os.environ) -> bool:
    """torchrun's workers, or several ranks started by some launcher (as tests/_ranks.py does).
    A single ``python pretrain_sd3.py`` (nohup, a shell) is left alone."""
    return "TORCHELASTIC_RUN_ID" in env or int(env.get("WORLD_SIZE", "1") or 1) > 1


def _watch(parent: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    print(f" > rank process {os.getpid()}: its launcher (pid {parent}) is gone; stopping "
          f"(SIGTERM now, SIGKILL in {grace_s:.0f} s)", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(grace_s: float = GRACE_S, poll_s: float = 1.0) -> bool:
    """Arm the watch (once per process). Returns whether it is armed."""
    global _thread
    if _thread is not None:
        return True
    parent = os.getppid()
    if parent == 1:  # already orphaned (or started by init): nothing to watch
        return False
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    _thread = threading.Thread(target=_watch, args=(parent, grace_s, poll_s), name="parent-watch", daemon=True)
    _thread.start()
    return True


FIRST_ERROR_KEY = "megatron_sd3/first_error"


def first_to_fail(timeout_s: float = 10.0) -> bool:
    """Whether this rank is the first of the job to meet an error after setup: an atomic counter in
    the job's rendezvous store (torchrun's agent holds it, so it outlives any rank). The first rank
    says what happened; the others, whose error is often only the first one's echo (a collective
    whose peer has gone), exit quietly. True when there is no job to ask (one process, no store,
    or a store that cannot be reached: better said twice than not at all)."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        return int(store.add(FIRST_ERROR_KEY, 1)) == 1
    except Exception:  # the store's host is gone: nobody else can have been told either
        return True


_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
               "timed out", "Socket Timeout", "NCCL", "ProcessGroupGloo")


def peer_failure(e: BaseException) -> Optional[str]:
    """The one line for a collective that failed because a peer died or hung; None for other errors."""
    import torch.distributed as dist

    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in text for s in _PEER_SIGNS))):
        return None
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return (f"a peer rank died or stopped responding ({first}); this rank stops too "
            f"(a hung peer is given --distributed-timeout-minutes)")
