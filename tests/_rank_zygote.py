"""A process that has imported torch, megatron-core and megatron_sd3 once, and forks the ranks of
the tests' local runs from there (tests/_ranks.py is its client; tests/README.md says why).

On 2 cores a tiny rank spends most of its CPU time importing (about 10 s, megatron-core's
``torch.compile``-decorated fusions pull in inductor), far more than its few training steps; a
fork of this interpreter starts with all of it done. Nothing else differs from
``python script.py``: each rank gets the environment it asks for (plus what the imports here
added to it, as its own imports would), its own working folder, ``sys.argv`` and ``sys.path[0]``,
its output file on fds 1 and 2 (starting with what the imports here printed), and runs the script
as ``__main__`` through ``runpy``; a normal interpreter exit follows (threads joined, atexit
handlers run), and an exception or ``sys.exit`` gives the exit status Python would.

    python tests/_rank_zygote.py SOCKET_PATH

serves requests on a unix socket, one JSON line each: ``{"script", "args", "cwd", "envs": [one
environment per rank], "logs": [per rank, one output path, or a stdout and a stderr path]}``. For each, a run manager is forked
that starts a session of its own (``killpg`` of its pid ends the run and all it started),
answers ``{"pid": ...}``, forks the ranks (``{"pids": [...]}``), says each rank's exit status as it
comes (``{"rank": r, "code": c}``: ``-N`` for a rank ended by signal N, as ``subprocess`` says),
and ends with ``{"returncodes": [...]}``. The server exits with the process
that started it (``PR_SET_PDEATHSIG``, and a check of its parent every second).
"""
import json
import os
import runpy
import select
import signal
import socket
import sys
import tempfile


def _die_with_parent():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _preload():
    """The imports every rank would do, their output kept to replay into each rank's log."""
    env_before = dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(1), os.dup(2)
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            # the package first, as every entry point: its import picks torch.compile's cache
            # folder before megatron-core's import touches it (megatron_sd3/compile_cache.py)
            import megatron_sd3  # noqa: F401
            import megatron_sd3.training.pretrain  # noqa: F401  (torch, megatron-core)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        capture.seek(0)
        printed = capture.read()
    added = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
    return printed, added


def _start_rank(script, args, cwd, env, log, printed):
    """In the forked rank: become ``python script args`` (returns the script's path to run)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    out, err = log if isinstance(log, list) else (log, log)
    for path, fdno in ((out, 1), (err, 2)):
        if fdno == 2 and err == out:
            os.dup2(1, 2)
            break
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if fdno == 2 or err == out:
            os.write(fd, printed)  # the imports' notices and warnings: stderr, as in a fresh interpreter
        os.dup2(fd, fdno)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    path = os.path.abspath(script)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(path)
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator from entropy
        sys.modules["numpy"].random.seed()
    return path


def _manage(conn, request, printed, added):
    """The run manager: a session of its own, the ranks, their exit statuses. Returns a script's
    path in a rank, None in the manager once it has answered."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    pids = []
    for env, log in zip(request["envs"], request["logs"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            return _start_rank(request["script"], request["args"], request["cwd"], {**env, **added}, log, printed)
        pids.append(pid)
    conn.sendall(json.dumps({"pids": pids}).encode() + b"\n")
    codes = [None] * len(pids)
    while None in codes:  # each rank's status as it ends
        pid, status = os.wait()
        if pid in pids:
            rank = pids.index(pid)
            codes[rank] = os.waitstatus_to_exitcode(status)
            conn.sendall(json.dumps({"rank": rank, "code": codes[rank]}).encode() + b"\n")
    conn.sendall(json.dumps({"returncodes": codes}).encode() + b"\n")
    conn.close()
    return None


def _serve(path, printed, added):
    """Returns a script's path in a forked rank; never returns in the server."""
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(8)
    os.rename(path + ".tmp", path)  # the client connects once the imports are done
    while True:
        while True:  # reap finished run managers
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if os.getppid() != parent:
            os._exit(0)
        if not select.select([server], [], [], 1.0)[0]:
            continue
        conn, _ = server.accept()
        with conn.makefile("rb") as fh:
            request = json.loads(fh.readline())
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            script = _manage(conn, request, printed, added)
            if script is None:
                os._exit(0)
            return script
        conn.close()


def main():
    _die_with_parent()
    printed, added = _preload()
    script = _serve(sys.argv[1], printed, added)
    # a rank: the script as __main__, then the interpreter's own exit
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
