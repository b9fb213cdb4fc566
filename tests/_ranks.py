"""Start N local ranks of a worker script (the env torchrun would set), wait with a timeout."""
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

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


# The variables a zygote does not import under: the rank's coordinates and pytest's note of the
# running test. Runs whose environments agree in everything else share a zygote; another
# environment (a variable a test sets may be read at import) gets a zygote of its own.
PER_RUN = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
           "PYTEST_CURRENT_TEST"}
ZYGOTE_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MAX_ZYGOTES = 3  # per pytest process; the least recently used one ends when another starts
_zygotes: dict = {}


class _Zygote:
    """tests/_rank_zygote.py under one environment, for this pytest process: started at its first
    use, ended with it."""

    def __init__(self, env):
        self.dir = tempfile.mkdtemp(prefix="rank_zygote_")
        self.socket = os.path.join(self.dir, "socket")
        self.env = env
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_rank_zygote.py"), self.socket],
                                     env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.dir, "zygote.log"), "wb"), stderr=subprocess.STDOUT)
        atexit.register(self.close)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _connect(self, deadline):
        while True:
            if self.proc.poll() is not None:
                with open(os.path.join(self.dir, "zygote.log"), errors="replace") as fh:
                    raise RuntimeError("the rank zygote exited:\n" + fh.read()[-3000:])
            if os.path.exists(self.socket):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(self.socket)
                return conn
            if time.time() > deadline:
                raise TimeoutError("the rank zygote did not start")
            time.sleep(0.05)

    def start(self, script, args, envs, logs, cwd=None):
        """Start the ranks (``logs``: per rank, an output path or a stdout and a stderr path)."""
        conn = self._connect(time.time() + 120)
        conn.sendall(json.dumps({"script": script, "args": list(args), "cwd": str(cwd or os.getcwd()), "envs": envs,
                                 "logs": logs}).encode() + b"\n")
        return ForkedRun(conn, len(envs))

    def run(self, script, args, envs, timeout, split=False, cwd=None):
        """Every rank's (return code, output), or with ``split`` (return code, stdout, stderr); on
        timeout the run's whole session is killed."""
        stem = os.path.join(self.dir, f"{os.getpid()}_{time.monotonic_ns()}_rank")
        logs = [[f"{stem}{r}.out", f"{stem}{r}.err"] if split else f"{stem}{r}.log" for r in range(len(envs))]
        run = self.start(script, args, envs, logs, cwd)
        try:
            codes = run.wait(timeout)
        finally:
            run.kill()  # nothing of the run outlives it
        outs = []
        for paths in logs:
            texts = []
            for path in paths if split else [paths]:
                with open(path, errors="replace") as fh:
                    texts.append(fh.read())
                os.remove(path)
            outs.append(texts)
        if codes is None:
            raise subprocess.TimeoutExpired([script, *args], timeout, output="\n".join(t[-1][-3000:] for t in outs))
        return [(code, *texts) for code, texts in zip(codes, outs)]


class ForkedRun:
    """The ranks of one run forked by a zygote: ``pgid`` (the run manager's session: ``killpg``
    ends them and all they started), ``pids``, and ``codes`` (each rank's exit status once said)."""

    def __init__(self, conn, nproc):
        self.conn, self.buf, self.closed = conn, b"", False
        self.codes = [None] * nproc
        self.pgid = self._next(120)["pid"]
        pids = self._next(120)
        if pids is None:
            raise RuntimeError("the rank zygote's run manager ended before its ranks started")
        self.pids = pids["pids"]

    def _next(self, timeout):
        """The manager's next message; None at the timeout or once it has ended."""
        deadline = time.time() + timeout
        while b"\n" not in self.buf:
            if self.closed:
                return None
            self.conn.settimeout(max(0.0, deadline - time.time()))  # 0: a look without waiting
            try:
                chunk = self.conn.recv(65536)
            except (socket.timeout, BlockingIOError):
                return None
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def pump(self, timeout=0.0):
        """Take in the exit statuses said within ``timeout``; a rank gone with its manager (killed
        with the run) counts as killed."""
        deadline = time.time() + timeout
        while None in self.codes:
            msg = self._next(max(0.0, deadline - time.time()))
            if msg is None:
                break
            if "rank" in msg:
                self.codes[msg["rank"]] = msg["code"]
        if self.closed:
            for rank, pid in enumerate(self.pids):
                if self.codes[rank] is None and not os.path.exists(f"/proc/{pid}"):
                    self.codes[rank] = -signal.SIGKILL

    def wait(self, timeout):
        """Every rank's exit status, or None if some rank still runs after ``timeout``."""
        deadline = time.time() + timeout
        while None in self.codes and time.time() < deadline:
            self.pump(min(0.5, max(0.0, deadline - time.time())))
        return None if None in self.codes else list(self.codes)

    def kill(self):
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(30)
        self.conn.close()
        self.closed = True


def zygote_for(envs):
    """The zygote for these environments (started if needed), or None: they differ outside
    PER_RUN, or ``SD3_TEST_FRESH_RANKS=1`` asks for fresh interpreters."""
    keys = {frozenset((k, v) for k, v in e.items() if k not in PER_RUN) for e in envs}
    if os.environ.get("SD3_TEST_FRESH_RANKS") == "1" or len(keys) != 1:
        return None
    [key] = keys
    zygote = _zygotes.pop(key, None)
    if zygote is None:
        if len(_zygotes) >= MAX_ZYGOTES:
            _zygotes.pop(next(iter(_zygotes))).close()
        zygote = _Zygote(dict(key))
    _zygotes[key] = zygote  # the most recently used last
    return zygote


def _fresh(path, args, envs, timeout, **popen):
    """``python path args`` per environment, each in a session of its own that ends with it."""
    procs = [subprocess.Popen([sys.executable, path, *args], env=e, start_new_session=True, **popen) for e in envs]
    try:
        return [p.communicate(timeout=timeout) for p in procs], [p.returncode for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_processes(script, args, envs, timeout):
    """Start ``len(envs)`` processes of ``python script args``, each with its environment (a rank
    each); every one's (return code, output). Forked from the zygote of their environment, or
    fresh interpreters under ``SD3_TEST_FRESH_RANKS=1``; nothing they start outlives them."""
    path = os.path.join(ROOT, script)
    zygote = zygote_for(envs)
    if zygote is not None:
        return zygote.run(path, args, envs, timeout)
    outs, codes = _fresh(path, args, envs, timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return [(code, out) for code, (out, _) in zip(codes, outs)]


def one_process_env(**extra) -> dict:
    """The environment of a single process started without torchrun (one thread, no warnings)."""
    env = {k: v for k, v in os.environ.items() if k not in PER_RUN - {"PYTEST_CURRENT_TEST"}}
    return dict(env, **ZYGOTE_ENV, **extra)


def run_script(script, args, env=None, cwd=None, timeout=300):
    """``subprocess.run([python, script, *args], env=env, cwd=cwd, capture_output=True, text=True)``,
    forked from the zygote of ``env`` (``os.environ`` if None)."""
    env = dict(os.environ) if env is None else env
    path = os.path.join(ROOT, script)
    zygote = zygote_for([env])
    if zygote is not None:
        [(code, out, err)] = zygote.run(path, args, [env], timeout, split=True, cwd=cwd)
        return subprocess.CompletedProcess([sys.executable, path, *args], code, out, err)
    [(out, err)], [code] = _fresh(path, args, [env], timeout, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    return subprocess.CompletedProcess([sys.executable, path, *args], code, out, err)


def rank_envs(nproc: int, env: dict | None = None) -> list[dict]:
    """The environment torchrun would give each of ``nproc`` local ranks."""
    port = str(free_port())
    return [dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                 **(env or {})) for r in range(nproc)]


def run_ranks(script: str, nproc: int, args: list[str], timeout: float = 240, env: dict | None = None):
    results = run_processes(script, args, rank_envs(nproc, env), timeout)
    failed = [r for r, (code, _) in enumerate(results) if code != 0]
    if failed:
        raise AssertionError(f"ranks {failed} of {script} failed:\n" + "\n".join(results[r][1][-3000:] for r in failed))
    return [out for _, out in results]


def run_training_worker(script: str, nproc: int, args: list[str], root: str, timeout: float = 300):
    """Run a training worker that saves ``rank{R}.pt`` ({"params": {global name: full tensor}, ...})
    into a folder named after its arguments; returns (per-rank dicts, merged full parameters).
    Every rank's parameters are read: a parameter held by several ranks (DP and CP replicas, TP
    ranks' gathered copies) must be the same bits on each, else the merge fails naming it."""
    import torch

    out = os.path.join(root, f"n{nproc}_" + "_".join(a.strip("-") for a in args))
    os.makedirs(out, exist_ok=True)
    run_ranks(script, nproc, [*args, "--out", out], timeout=timeout)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(nproc)]
    params = {}
    held_by = {}
    for rank, r in enumerate(ranks):
        for k, v in r.get("params", {}).items():
            if k in params:
                assert torch.equal(params[k], v), (
                    f"{k}: rank {rank}'s copy differs from rank {held_by[k]}'s "
                    f"(max |diff| {(params[k].double() - v.double()).abs().max().item():.3g})")
            else:
                params[k], held_by[k] = v, rank
    return ranks, params
