"""Hang detection and in-job restarts with NVIDIA's nvidia-resiliency-ext (``--enable-ft-package``).

Megatron-LM's integration, on the library's section API (docs/design.md, "Faults"): ``ft_launcher``
(``bash launch.sh --enable-ft-package ...`` starts it in place of torchrun) runs one rank monitor
per rank; each rank's ``RankMonitorClient`` tells its monitor when it opens and closes a section:

    setup          start-up: the model, the data, the checkpoint load, the first iteration
    step           one training iteration, its data read included
    eval           one evaluation with its samples
    checkpointing  one checkpoint save (and an asynchronous save's finalisation)

A section open longer than its timeout, or the time between sections (logging) longer than the
out-of-section timeout, is a hang: the monitor kills the rank, the launcher stops the others and
restarts the worker group (``--max-restarts``), and the same command resumes from the last complete
checkpoint. A long save or evaluation has its own timeout and is not taken for a hang.

The timeouts come from the launcher (launch.sh: FT_INITIAL_HEARTBEAT_TIMEOUT for setup,
FT_HEARTBEAT_TIMEOUT for a step and between sections, FT_EVAL_TIMEOUT, FT_SAVE_TIMEOUT).
``--calc-ft-timeouts`` replaces them with what the run has seen (the library's rule: the longest
time seen in each section, times its safety factor, 5), after each save and at the end, all ranks
agreeing, and keeps them in ``SAVE/ft_state.json`` next to the checkpoints, as Megatron-LM does;
a restarted or resumed run starts with them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Optional

import torch.distributed as dist

from megatron_sd3.config import ConfigError

SETUP, STEP, EVAL, SAVE = "setup", "step", "eval", "checkpointing"
SECTIONS = (SETUP, STEP, EVAL, SAVE)
INSTALL = "pip install nvidia-resiliency-ext==0.4.1"
STATE_FILE = "ft_state.json"
# Megatron-LM's rule: the step timeout is learned from at least this many iterations
MIN_STEPS_FOR_STEP_TIMEOUT = 16


def check_installed() -> Optional[str]:
    """The one-line problem when --enable-ft-package cannot work here, else None."""
    import importlib.util

    if importlib.util.find_spec("nvidia_resiliency_ext") is None:
        return f"--enable-ft-package needs nvidia-resiliency-ext: {INSTALL}"
    return None


def restart_count() -> int:
    """Worker-group restarts so far in this job (torchrun and ft_launcher set it; 0 otherwise)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _fmt(t) -> str:
    return "off" if t is None or t == float("inf") else f"{t:.0f} s" if t >= 10 else f"{t:.1f} s"


class FaultTolerance:
    """The rank's side of the rank monitor: sections around the training loop's phases."""

    def __init__(self, client, state_path: str, calc_timeouts: bool, async_save: bool, resumed: bool):
        self.client = client
        self.state_path = state_path
        self.calc_timeouts = calc_timeouts
        self.async_save = async_save
        self.resumed = resumed
        self.restarts = restart_count()
        self.steps = self.saves = self.evals = 0
        client.start_section(SETUP)

    @classmethod
    def start(cls, args, resumed: bool) -> Optional["FaultTolerance"]:
        """Connect to this rank's monitor (``ft_launcher``) when ``--enable-ft-package``."""
        if not args.enable_ft_package:
            return None
        # (nvidia-resiliency-ext is there: arguments.validate checked it)
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
        from nvidia_resiliency_ext.fault_tolerance.data import FT_RANK_MONITOR_IPC_SOCKET_ENV_VAR

        if not os.environ.get(FT_RANK_MONITOR_IPC_SOCKET_ENV_VAR):
            e = ConfigError("--enable-ft-package: this rank has no rank monitor (it was not started by "
                            "ft_launcher); start the run with: bash launch.sh --enable-ft-package ...")
            e.quiet = os.environ.get("RANK", "0") != "0"  # before the process group: rank 0 says it
            raise e
        client = RankMonitorClient()
        state_path = os.path.join(args.save, STATE_FILE)
        if os.path.exists(state_path):
            with open(state_path) as fh:
                client.load_state_dict(json.load(fh))
        client.init_workload_monitoring()
        missing = [s for s in SECTIONS if s not in client.cfg.rank_section_timeouts]
        if missing:
            client.shutdown_workload_monitoring()
            raise ConfigError(f"--enable-ft-package: ft_launcher has no timeout for the section(s) {','.join(missing)}; "
                              f"start the run with bash launch.sh --enable-ft-package, or give ft_launcher "
                              f"--ft-rank-section-timeouts=setup:600,step:180,eval:600,checkpointing:600")
        return cls(client, state_path, args.calc_ft_timeouts, args.async_save, resumed)

    # -- what the log says ---------------------------------------------------------------------------
    def timeouts_line(self) -> str:
        st = self.client.section_timeouts
        parts = ", ".join(f"{s} {_fmt(st.section.get(s))}" for s in SECTIONS)
        learned = sorted(st.calculated_sections) + (["between sections"] if st.is_out_of_section_calculated else [])
        src = f"learned ({', '.join(learned)}) from {self.state_path}" if learned else "from the launcher"
        return (f"fault tolerance: nvidia-resiliency-ext rank monitors, section timeouts {parts}, between sections "
                f"{_fmt(st.out_of_section)} ({src}){'; learning them (--calc-ft-timeouts)' if self.calc_timeouts else ''}")

    def restart_line(self) -> Optional[str]:
        if self.restarts == 0:
            return None
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        return (f"fault tolerance: in-job restart {self.restarts} of at most {limit} (MAX_RESTARTS): the launcher "
                f"restarted the workers after a rank failed or stopped answering (its rank monitor's warning above "
                f"names the rank and the seconds); resuming from the last complete checkpoint")

    # -- sections ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self):
        """One training iteration. The first one (compilation, warm-up) still counts as setup."""
        if self.steps == 0:  # setup is open since start()
            yield
            self.client.end_section(SETUP)
        else:
            self.client.start_section(STEP)
            yield
            self.client.end_section(STEP)
        self.steps += 1

    @contextlib.contextmanager
    def evaluation(self):
        self.client.start_section(EVAL)
        yield
        self.client.end_section(EVAL)
        self.evals += 1

    @contextlib.contextmanager
    def checkpointing(self, iteration: Optional[int] = None, finalization: bool = False):
        self.client.start_section(SAVE)
        self._maybe_simulate_hang(SAVE, iteration)
        yield
        self.client.end_section(SAVE)
        if not finalization:
            self.saves += 1
            self._maybe_update_timeouts()

    def _maybe_simulate_hang(self, section: str, iteration: Optional[int]) -> None:
        """A testing aid, as Megatron-LM's FT_SIM_FAULT_DESC: FT_SIM_HANG=SECTION:RANK:ITERATION:START
        freezes (SIGSTOP) global rank RANK when it opens SECTION at ITERATION in the workers'
        START-th start (0: the first), e.g. checkpointing:1:4:0 during the save of iteration 4."""
        spec = os.environ.get("FT_SIM_HANG")
        if not spec or iteration is None:
            return
        want_section, rank, at, start = spec.split(":")
        if (want_section, int(rank), int(at), int(start)) == (section, dist.get_rank(), iteration, self.restarts):
            print(f"FT_SIM_HANG: rank {rank} freezes in '{section}' at iteration {iteration}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    def finish(self) -> None:
        """At the end of the run: learn the timeouts once more (all of them), then disconnect."""
        self._maybe_update_timeouts(closing=True)
        self.client.end_all_sections()
        self.client.shutdown_workload_monitoring()

    # -- --calc-ft-timeouts --------------------------------------------------------------------------
    def _maybe_update_timeouts(self, closing: bool = False) -> None:
        """Megatron-LM's choice of what can be learned yet (every rank calls this at the same point:
        the library takes the maximum over the ranks)."""
        if not self.calc_timeouts:
            return
        sections = []
        if self.resumed:  # a start-up that loaded a checkpoint (a fresh start is shorter)
            sections.append(SETUP)
        if self.steps >= MIN_STEPS_FOR_STEP_TIMEOUT:
            sections.append(STEP)
        if self.evals:
            sections.append(EVAL)
        if self.saves and not self.async_save:  # an async save's section varies too much run to run
            sections.append(SAVE)
        out_of_section = closing and {SETUP, STEP} <= set(sections) and self.saves > 0
        if not sections:
            return
        self.client.calculate_and_set_section_timeouts(selected_sections=sections, calc_out_of_section=out_of_section,
                                                       skip_if_not_ready=True)
        if dist.get_rank() == 0:
            tmp = self.state_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self.client.state_dict(), fh)
            os.replace(tmp, self.state_path)
