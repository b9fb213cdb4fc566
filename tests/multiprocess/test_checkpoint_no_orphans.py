"""No rank outlives its job: a rank whose peer died or hangs, or whose launcher died, exits in
bounded time (``--distributed-timeout-minutes`` and the parent-death watch of
megatron_sd3/training/watchdog.py)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from _jobs import ENTRY, Job, metrics_records
from _ranks import ROOT, free_port

LONG = ["--config", "configs/sd3_light_tiny.toml", "--pipeline-model-parallel-size", "2", "--log-interval", "1",
        "--no-progress", "--train-iters", "100000"]


def _launcher_env(**extra):
    """The environment of a process started as a user would start torchrun (no rank variables)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _kill_launch(launcher, family):
    """SIGKILL the launcher's group and every group of ``family`` (torchrun starts each rank in a
    session of its own), then reap the launcher."""
    groups = {launcher.pid}
    for p in family:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()


def _wait_training(metrics, job_alive, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and job_alive():
        if len(metrics_records(metrics)) >= 2:
            return True
        time.sleep(0.2)
    return False


def _wait_exit(proc, timeout):
    t0 = time.time()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.time() - t0


@pytest.mark.timeout(600)
def test_rank_whose_peer_died_exits(tmp_path):
    m = str(tmp_path / "m.jsonl")
    with Job([*LONG, "--metrics-file", m], 2, str(tmp_path), "peer") as job:
        assert _wait_training(m, lambda: job.procs[0].poll() is None), job.log(0)[-3000:]
        os.kill(job.procs[1].pid, signal.SIGKILL)
        took = _wait_exit(job.procs[0], 120)
        assert took is not None, "rank 0 still runs 120 s after its peer died"
        assert job.procs[0].returncode == 1, job.log(0)[-3000:]
        assert "error: rank 0: a peer rank died or stopped responding" in job.log(0)
        print(f"\nrank 0 exited {took:.1f} s after its peer was killed (code {job.procs[0].returncode})")


@pytest.mark.timeout(600)
def test_rank_whose_peer_hangs_exits_after_the_distributed_timeout(tmp_path):
    """A peer that is alive but stuck (SIGSTOP) keeps its sockets open: only the process-group
    timeout ends the wait. 0.25 minutes here; megatron's default of 10 would outlast the test."""
    m = str(tmp_path / "m.jsonl")
    with Job([*LONG, "--metrics-file", m, "--distributed-timeout-minutes", "0.25"], 2, str(tmp_path), "hang") as job:
        assert _wait_training(m, lambda: job.procs[0].poll() is None), job.log(0)[-3000:]
        os.kill(job.procs[1].pid, signal.SIGSTOP)
        took = _wait_exit(job.procs[0], 150)
        assert took is not None, "rank 0 still waits 150 s after its peer hung (timeout 15 s)"
        assert job.procs[0].returncode == 1
        log = job.log(0)
        assert "error: rank 0: a peer rank died or stopped responding" in log and "Traceback" not in log, log[-3000:]
        print(f"\nrank 0 exited {took:.1f} s after its peer hung (code {job.procs[0].returncode}); "
              f"last lines:\n{job.log(0)[-600:]}")


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_ranks_of_a_killed_torchrun_exit(tmp_path):
    """torchrun SIGKILLed (it cannot stop its ranks) after a checkpoint was saved: the ranks and what
    they started go too (megatron-core's checkpoint writer starts a results server per rank)."""
    m = str(tmp_path / "m.jsonl")
    env = _launcher_env()
    family = []
    with open(tmp_path / "torchrun.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                     "--master-port", str(free_port()), ENTRY, *LONG, "--metrics-file", m,
                                     "--save", str(tmp_path / "ck"), "--save-interval", "3"],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        latest = tmp_path / "ck" / "latest_checkpointed_iteration.txt"
        assert _wait_training(m, lambda: launcher.poll() is None), (tmp_path / "torchrun.log").read_text()[-3000:]
        deadline = time.time() + 120  # after a save: the ranks have started megatron's writer helpers
        while time.time() < deadline and launcher.poll() is None and not latest.exists():
            time.sleep(0.2)
        assert latest.exists(), (tmp_path / "torchrun.log").read_text()[-3000:]
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        helpers = [c for r in ranks for c in _children(r)]
        assert helpers, "no rank has started a checkpoint helper process: the test no longer covers them"
        family += ranks + helpers
        launcher.kill()
        launcher.wait()
        left = _alive_after(family, 60)
        assert not left, f"processes {left} of the job still run 60 s after torchrun died"
    finally:
        _kill_launch(launcher, family)


@pytest.mark.timeout(180)
def test_children_a_rank_forks_die_with_it(tmp_path):
    """Children that a rank forks after start-up and that block forever (a queue read as in
    megatron-core's writer workers, a bare fork, a fork from a thread that has ended) are gone
    within 60 s of kill -9 of the rank (watchdog.forked_children_die_with_parent)."""
    env = _launcher_env()
    rank = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_fork_worker.py")], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        line = ""
        for line in rank.stdout:
            if line.startswith("CHILDREN"):
                break
        assert line.startswith("CHILDREN"), line
        words = line.split()
        children = [int(w) for w in words[1:words.index("ALIVE")]]
        assert len(children) == 3 and int(words[-1]) == 3, line  # all alive while the rank is
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        left = _alive_after(children, 60)
        assert not left, f"children {left} of the killed rank still run 60 s after it died"
    finally:
        for p in [rank.pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rank.wait()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _alive_after(pids, seconds):
    """The processes of ``pids`` still alive once all are gone or ``seconds`` have passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.timeout(600)
def test_no_process_of_the_run_outlives_a_rank_killed_mid_save(tmp_path):
    """kill -9 of a rank while a checkpoint is being written (megatron-core forks writer workers
    for it): torchrun ends the run, and 60 s after torchrun exits no process of the run is left."""
    m, ck = str(tmp_path / "m.jsonl"), tmp_path / "ck"
    env = _launcher_env()
    family = set()
    with open(tmp_path / "torchrun.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                     "--master-port", str(free_port()), ENTRY, *LONG, "--metrics-file", m,
                                     "--save", str(ck), "--save-interval", "1"],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        assert _wait_training(m, lambda: launcher.poll() is None), (tmp_path / "torchrun.log").read_text()[-3000:]
        # Mid-save: a rank has a forked copy of itself alive (megatron-core's writer workers live
        # only while dist_checkpointing.save writes) and the save's iter_*.tmp folder exists; kill
        # that rank. A save that ends between the two looks is missed, and the next one (every
        # iteration) is tried.
        deadline, victim = time.time() + 120, None
        while time.time() < deadline and launcher.poll() is None and victim is None:
            family.update(_descendants(launcher.pid))
            for r in _children(launcher.pid):
                if any(_cmdline(c) == _cmdline(r) for c in _children(r)) and any(ck.glob("iter_*.tmp")):
                    family.update(_descendants(launcher.pid))
                    os.kill(r, signal.SIGKILL)
                    victim = r
                    break
            else:
                time.sleep(0.005)
        assert victim is not None, "no rank was seen mid-save in 120 s\n" + (tmp_path / "torchrun.log").read_text()[-3000:]
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None:
            family.update(_descendants(launcher.pid))
            time.sleep(0.05)
        assert launcher.poll() is not None, "torchrun still runs 180 s after a rank was killed"
        assert len(family) > 2, family  # the ranks and what they started
        left = _alive_after(family, 60)
        assert not left, f"processes {left} of the run still run 60 s after torchrun exited"
    finally:
        _kill_launch(launcher, family)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fail_rank", [2, pytest.param(0, marks=pytest.mark.slow)])  # 0: the same path
def test_an_error_in_one_of_four_ranks_is_said_once(tmp_path, fail_rank):
    """PP=2 x DP=2 under torchrun; one rank meets an error mid-run: one line, by that rank, naming
    it; the other ranks say nothing (watchdog.first_to_fail); the run exits non-zero."""
    env = _launcher_env(FAIL_RANK=str(fail_rank))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                        str(free_port()), os.path.join(ROOT, "tests", "_failing_rank_entry.py"), *LONG[:-1], "8",
                        "--global-batch-size", "8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    errors = [ln for ln in out.splitlines() if "error:" in ln and "pretrain_sd3.py" in ln]
    assert errors == [f"pretrain_sd3.py: error: rank {fail_rank}: shard /data/shard-00007.pt: truncated "
                      f"(read 1024 of 4096 bytes); redo it"], out[-4000:]
    assert "a peer rank died" not in out and not re.search(r"\[rank\d\]: Traceback", out), out[-4000:]
