"""Start N local ranks of a worker script (the env torchrun would set), wait with a timeout."""
import os
import subprocess
import sys

from megatron_sd3.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
