"""Local multi-rank jobs that tests can kill: the ranks of one job share a process group of their own.

``Job(args, nproc, logdir, tag)`` starts ``pretrain_sd3.py`` on ``nproc`` ranks with the
environment torchrun would give them (as tests/_ranks.py does), each rank's output in
``logdir/tag.rankR.log``; the ranks are forked from the rank zygote of that environment
(tests/_rank_zygote.py), or fresh interpreters under ``SD3_TEST_FRESH_RANKS=1``. ``procs`` holds
one Popen-like handle per rank (``pid``, ``poll``, ``wait``, ``returncode``). ``kill_all()``
SIGKILLs the whole process group (ranks and anything they started), so no process outlives the
test; use the job as a context manager.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from _ranks import ROOT, free_port, zygote_for

ENTRY = os.path.join(ROOT, "pretrain_sd3.py")


class ForkedRank:
    """One rank of a zygote's run, as ``subprocess.Popen`` shows a process."""

    def __init__(self, run, rank):
        self.run, self.rank, self.pid = run, rank, run.pids[rank]

    @property
    def returncode(self):
        return self.run.codes[self.rank]

    def poll(self):
        self.run.pump()
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() >= deadline:
                raise subprocess.TimeoutExpired(f"rank {self.rank}", timeout)
            self.run.pump(0.2 if deadline is None else min(0.2, max(0.0, deadline - time.time())))
        return self.returncode


class Job:
    def __init__(self, args, nproc, logdir, tag, env=None, script=ENTRY):
        port = str(free_port())
        envs = [dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                     PYTHONPATH=ROOT, **(env or {})) for r in range(nproc)]
        self.log_paths = [os.path.join(logdir, f"{tag}.rank{r}.log") for r in range(nproc)]
        zygote = zygote_for(envs)
        if zygote is not None:
            self.run = zygote.start(script, args, envs, self.log_paths, cwd=ROOT)
            self.procs, self.pgid = [ForkedRank(self.run, r) for r in range(nproc)], self.run.pgid
            return
        self.run, self.procs = None, []
        for e, path in zip(envs, self.log_paths):
            group = {"process_group": 0 if not self.procs else self.procs[0].pid}
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=e, stdout=log,
                                                   stderr=subprocess.STDOUT, **group))
        self.pgid = self.procs[0].pid

    def wait(self, timeout):
        """Return codes once every rank has exited, or None if some rank still runs after ``timeout``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(p.poll() is not None for p in self.procs):
                return [p.returncode for p in self.procs]
            time.sleep(0.05)
        return None

    def wait_for(self, pattern, timeout, rank=0):
        """Wait until rank ``rank``'s log matches ``pattern`` (then None) or every rank has exited
        (then their return codes, as ``wait``)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.log(rank)):
                return None
            if all(p.poll() is not None for p in self.procs):
                return [p.returncode for p in self.procs]
            time.sleep(0.02)
        return None

    def log(self, rank=0):
        """Rank ``rank``'s output so far ("" before a forked rank has opened its log)."""
        try:
            with open(self.log_paths[rank], errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill_all(self):
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.run is not None:
            self.run.kill()  # every rank's status, then the manager's connection closed
        for p in self.procs:
            p.wait()
        deadline = time.time() + 10  # children of the ranks (writers, managers) go with the group
        while self.group_alive() and time.time() < deadline:
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()


def metrics_records(path):
    """Every record of a metrics file, in order (a resumed run appends what it redoes)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
