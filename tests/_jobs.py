"""Local multi-rank jobs that tests can kill: the ranks of one job share a process group of their own.

``Job(args, nproc, logdir, tag)`` starts ``pretrain_sd3.py`` on ``nproc`` ranks with the
environment torchrun would give them (as tests/_ranks.py does), each rank's output in
``logdir/tag.rankR.log``. ``kill_all()`` SIGKILLs the whole process group (ranks and anything they
started), so no process outlives the test; use the job as a context manager.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from _ranks import ROOT, free_port

ENTRY = os.path.join(ROOT, "pretrain_sd3.py")


class Job:
    def __init__(self, args, nproc, logdir, tag, env=None, script=ENTRY):
        port = str(free_port())
        self.procs, self.log_paths = [], []
        for r in range(nproc):
            e = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                     LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, **(env or {}))
            path = os.path.join(logdir, f"{tag}.rank{r}.log")
            self.log_paths.append(path)
            group = {"process_group": 0 if r == 0 else self.procs[0].pid}
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
        with open(self.log_paths[rank], errors="replace") as fh:
            return fh.read()

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
