"""Start N local ranks of a worker script (the env torchrun would set), wait with a timeout."""
import os
import random
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A free rendezvous port for a test's ranks, below the kernel's ephemeral range (where
    torchrun --standalone and bind(0) draw theirs) and in a block of its own per pytest-xdist
    worker, so two tests running side by side never pick the same one between the check here and
    the ranks' bind (a bind(0) port was seen taken in that gap: EADDRINUSE)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    # 21000-31499: above launch.sh's SLURM ports for the local cluster's small job ids (20000 +
    # job id), below 32768, where the default ephemeral range starts
    lo = 21000 + 1500 * (index % 7)
    for _ in range(200):
        port = random.randrange(lo, lo + 1500)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{lo + 1499}")


def run_ranks(script: str, nproc: int, args: list[str], timeout: float = 240, env: dict | None = None):
    port = str(free_port())
    procs, logs = [], []
    for r in range(nproc):
        e = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                 **(env or {}))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failed = []
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
            if p.returncode != 0:
                failed.append(r)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if failed:
        raise AssertionError(f"ranks {failed} of {script} failed:\n" + "\n".join(logs[r][-3000:] for r in failed))
    return logs


def run_training_worker(script: str, nproc: int, args: list[str], root: str, timeout: float = 300):
    """Run a training worker that saves ``rank{R}.pt`` ({"params": {global name: full tensor}, ...})
    into a folder named after its arguments; returns (per-rank dicts, merged full parameters)."""
    import torch

    out = os.path.join(root, f"n{nproc}_" + "_".join(a.strip("-") for a in args))
    os.makedirs(out, exist_ok=True)
    run_ranks(script, nproc, [*args, "--out", out], timeout=timeout)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(nproc)]
    params = {}
    for r in ranks:
        for k, v in r.get("params", {}).items():
            params.setdefault(k, v)  # TP ranks hold identical gathered copies
    return ranks, params
