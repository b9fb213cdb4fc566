"""launch.sh on a real two-node SLURM: `tools/slurm_local.sh start --nodes 2` on this machine.

Each slurmd runs in a network namespace of its own with its own hostname (sd3node1, sd3node2),
joined to slurmctld by veths on a bridge that the script creates. `sbatch -N 2 launch.sh` then
takes launch.sh's multi-node path (srun -> one torchrun per node, rendezvous on the first node)
and trains the tiny preset with PP=2, one rank per node.

Needs root, Debian's `slurmctld slurmd munge`, iproute2 and util-linux (unshare, nsenter), and
network namespaces with veths. Without them the tests skip, except under CI=true, where that is a
failure. The cluster uses its own SLURM_LOCAL_DIR and port, so a single-node cluster of
tests/launch/test_launch.py may run at the same time; it is stopped again when the module ends, and the
teardown checks that no namespace, interface or daemon is left.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.sh"
SLURM_LOCAL = ROOT / "tools" / "slurm_local.sh"
CONFIG = str(ROOT / "configs" / "sd3_light_tiny.toml")

LOCAL_DIR = "/tmp/megatron_sd3_slurm_2node"
LOCAL_PORT = "6827"
NODES = ["sd3node1", "sd3node2"]
BRIDGE = "sd3br0"
LATEST_FILE = "latest_checkpointed_iteration.txt"
# PP=2 over two nodes, one rank each; synthetic data.
TRAIN_ARGS = ["--pipeline-model-parallel-size", "2", "--mock-data", "--log-interval", "1",
              "--lr-warmup-iters", "1"]
SHORT_ITERS = 3
LONG_ITERS = 100000

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need(reason):
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    for k in ("NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "EXTRA_ARGS",
              "LAUNCH_SRUN", "LAUNCH_STAGE", "LAUNCH_ROOT", "ENTRY"):
        env.pop(k, None)
    env.update(SLURM_LOCAL_DIR=LOCAL_DIR, SLURM_LOCAL_PORT=LOCAL_PORT, SLURM_CONF=f"{LOCAL_DIR}/slurm.conf",
               CONFIG=CONFIG, PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tool(*args, timeout=120):
    return subprocess.run(["bash", str(SLURM_LOCAL), *args], env=base_env(), capture_output=True,
                          text=True, timeout=timeout)


def leftovers():
    """What of the cluster still exists: namespaces, interfaces, live daemons."""
    left = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left += [f"netns {n}" for n in NODES if n in netns]
    for link in [BRIDGE, "sd3h1", "sd3h2"]:
        if subprocess.run(["ip", "link", "show", link], capture_output=True).returncode == 0:
            left.append(f"interface {link}")
    for pidfile in Path(LOCAL_DIR).glob("slurm*.pid"):
        try:
            os.kill(int(pidfile.read_text()), 0)
            left.append(f"daemon {pidfile.name}")
        except (ValueError, ProcessLookupError):
            pass
    return left


def _can_make_namespaces():
    """A throw-away network namespace with a veth pair in it (nothing on the host is touched)."""
    r = subprocess.run(["unshare", "--net", "--uts", "--mount", "sh", "-c",
                        "ip link add sd3probe0 type veth peer name sd3probe1 && hostname sd3probe"],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


@pytest.fixture(scope="module")
def cluster():
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "squeue", "ip",
                           "unshare", "nsenter") if shutil.which(b) is None]
    if missing:
        _need(f"SLURM or namespace tools not installed ({', '.join(missing)} missing): apt-get install "
              "-y --no-install-recommends slurmctld slurmd munge iproute2 util-linux")
    if os.geteuid() != 0:
        _need("the two-node SLURM cluster (tools/slurm_local.sh start --nodes 2) must be started as root")
    ok, why = _can_make_namespaces()
    if not ok:
        _need(f"cannot create a network namespace with a veth pair here: {why}")
    already = tool("status", "--nodes", "2").returncode == 0
    if not already:
        r = tool("start", "--nodes", "2")
        if r.returncode != 0:
            out = r.stdout + r.stderr
            tool("stop")
            pytest.fail(f"tools/slurm_local.sh start --nodes 2 failed:\n{out}")
    try:
        yield f"{LOCAL_DIR}/slurm.conf"
    finally:
        if not already:
            r = tool("stop", timeout=90)
            assert r.returncode == 0, r.stderr
            assert not leftovers(), f"left after `tools/slurm_local.sh stop`: {leftovers()}"


def latest_iteration(save: Path):
    f = save / LATEST_FILE
    text = f.read_text().strip() if f.exists() else ""
    return int(text) if text.isdigit() else None


def sbatch(tmp_path, args, name):
    out = tmp_path / f"{name}-%j.out"
    r = subprocess.run(["sbatch", "--parsable", "-N", "2", f"--job-name={name}", f"--output={out}",
                        f"--chdir={tmp_path}", str(LAUNCH), *args, *TRAIN_ARGS],
                       env=base_env(GPUS_PER_NODE=1), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, Path(str(out).replace("%j", job))


def job_state(job):
    r = subprocess.run(["scontrol", "-o", "show", "job", job], env=base_env(), capture_output=True,
                       text=True)
    for field in r.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def wait_job(job, timeout):
    """Wait until squeue no longer lists the job, then return its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=base_env(),
                           capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return job_state(job)
        time.sleep(0.5)
    seen = diagnose(job)  # before the cancel: what SLURM saw while the job did not end
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=base_env())
    raise AssertionError(f"job {job} did not end within {timeout}s\n{seen}")


def diagnose(job):
    """The job's state and reason, the nodes, and the daemons' last log lines."""
    parts = []
    for cmd in (["scontrol", "-o", "show", "job", job], ["sinfo", "-N", "-o", "%N %T %E"],
                ["squeue", "-s", "-j", job]):
        r = subprocess.run(cmd, env=base_env(), capture_output=True, text=True)
        parts.append(f"$ {' '.join(cmd)}\n{(r.stdout + r.stderr).strip()}")
    for log in sorted(Path(LOCAL_DIR, "log").glob("*.log")):
        parts.append(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(parts)


def log_of(path):
    return path.read_text() if path.exists() else "(no job output)"


def test_each_node_has_its_own_namespace_and_hostname(cluster):
    """Each slurmd is in a network and UTS namespace of its own whose hostname is the node name,
    and `start` on the running cluster only checks it."""
    own_net = os.readlink("/proc/self/ns/net")
    nets = set()
    for node in NODES:
        pid = int((Path(LOCAL_DIR) / f"slurmd-{node}.pid").read_text())
        net = os.readlink(f"/proc/{pid}/ns/net")
        assert net != own_net, f"slurmd of {node} runs in this process's network namespace"
        nets.add(net)
        host = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert host == node
    assert len(nets) == len(NODES), "the two slurmd share a network namespace"
    pids = {p.name: p.read_text() for p in Path(LOCAL_DIR).glob("slurm*.pid")}
    r = tool("start", "--nodes", "2")
    assert r.returncode == 0 and "already running" in r.stderr, r.stderr
    assert {p.name: p.read_text() for p in Path(LOCAL_DIR).glob("slurm*.pid")} == pids
    r = tool("start")
    assert r.returncode != 0 and "2-node cluster is running" in r.stderr, r.stderr


@pytest.mark.timeout(150)
def test_sbatch_two_nodes_trains_pp2_and_saves(cluster, tmp_path):
    """`sbatch -N 2 launch.sh ...`: one torchrun per node through srun, PP=2 across the nodes,
    rendezvous on the first node's namespace address; the job completes with a checkpoint."""
    save = tmp_path / "ckpt"
    job, out = sbatch(tmp_path, ["--save", str(save), "--train-iters", str(SHORT_ITERS),
                                 "--save-interval", "1"], "two_node")
    state = wait_job(job, 130)
    log = log_of(out)
    assert state == "COMPLETED", f"job {job}: {state}\n{log[-4000:]}"
    assert latest_iteration(save) == SHORT_ITERS, log[-4000:]
    assert "srun --nodes=2" in log, log[-4000:]
    for rank, node in enumerate(NODES):
        assert f"launch.sh: node {rank}/2 on {node}:" in log, log[-4000:]
    assert log.count("--master-addr=sd3node1") == 2, log[-4000:]
    assert "world size 2 = TP 1 x PP 2 x CP 1 x DP 1" in log, log[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_node_scancel_batch_term_saves(cluster, tmp_path):
    """`scancel --batch --signal=TERM` on a running two-node job: launch.sh's batch shell passes
    SIGTERM to the job's steps, the ranks on both nodes save (--exit-signal-handler) and exit
    before SLURM's KillWait. The only checkpoint is the one written on the signal."""
    save = tmp_path / "ckpt"
    job, out = sbatch(tmp_path, ["--save", str(save), "--train-iters", str(LONG_ITERS),
                                 "--save-interval", str(LONG_ITERS), "--exit-signal-handler"],
                      "two_node_cancel")
    deadline = time.time() + 110
    while " iteration        2/" not in log_of(out):
        assert job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), log_of(out)[-4000:]
        assert time.time() < deadline, f"job {job} did not reach iteration 2\n{log_of(out)[-4000:]}"
        time.sleep(0.5)
    assert latest_iteration(save) is None
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=base_env(), check=True)
    t0 = time.time()
    state = wait_job(job, 60)
    log = log_of(out)
    # torchrun exits non-zero after SIGTERM, so SLURM may report FAILED.
    assert state in ("COMPLETED", "FAILED", "CANCELLED"), f"{state}\n{log[-4000:]}"
    assert time.time() - t0 < 30, "ranks did not exit before SLURM's KillWait (SIGKILL)"
    assert "got SIGTERM: signalling the job's steps" in log, log[-4000:]
    stopped = latest_iteration(save)
    assert stopped is not None and 2 <= stopped < LONG_ITERS, log[-4000:]
    assert f"stopped: signal at iteration {stopped}/{LONG_ITERS}" in log, log[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_restart_does_not_recover_a_job_of_a_dead_cluster(cluster, tmp_path):
    """The daemons killed while a job runs (a machine that went down, a snapshot taken mid-job),
    then `start`: the new cluster is empty and its nodes take the next job. Recovering the saved
    state brought the old job back RUNNING on both nodes, for ever, with every later job pending.
    Runs last in this file: it restarts the module's cluster."""
    r = subprocess.run(["sbatch", "--parsable", "-N", "2", "--job-name=ghost", f"--chdir={tmp_path}",
                        "--output=/dev/null", "--wrap", "sleep 600"], env=base_env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    ghost = r.stdout.strip().split(";")[0]
    deadline = time.time() + 60
    while job_state(ghost) != "RUNNING":
        assert time.time() < deadline, f"job {ghost} never started\n{diagnose(ghost)}"
        time.sleep(0.5)
    for pidfile in Path(LOCAL_DIR).glob("slurm*.pid"):  # no clean shutdown: the state still has the job
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    r = tool("stop", timeout=90)  # what is left: the namespaces and the job's processes in them
    assert r.returncode == 0, r.stderr
    left = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of job {ghost} outlive its cluster: {left}"
    r = tool("start", "--nodes", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=base_env(), capture_output=True, text=True)
    assert listed.returncode == 0 and not listed.stdout.strip(), listed.stdout + listed.stderr
    r = subprocess.run(["sbatch", "--parsable", "-N", "2", "--job-name=after", f"--chdir={tmp_path}",
                        "--output=/dev/null", "--wrap", "true"], env=base_env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert wait_job(r.stdout.strip().split(";")[0], 60) == "COMPLETED"


def _train_rows(metrics: Path):
    import json

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if r.get("type", "train") == "train"]


def _ranks_on(node: str):
    """The pretrain_sd3.py processes running in a node's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"pretrain_sd3.py") for a in cmd[:3]):
            out.append(pid)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_requeues_the_job_and_it_resumes_bit_exact(cluster, tmp_path):
    """`tools/slurm_local.sh kill-node sd3node2` after the first checkpoint (every process of the
    node, slurmd included, as when a machine dies): the other node's rank ends at once (its
    collectives fail, not after the distributed timeout), the job leaves RUNNING within 120 s and
    is requeued (#SBATCH --requeue); `revive-node`, and the same command finishes COMPLETED with
    every iteration's loss equal to an uninterrupted run of the same layout."""
    iters = 40
    ref = tmp_path / "ref"
    r = subprocess.run(["bash", str(LAUNCH), *TRAIN_ARGS, "--train-iters", str(iters), "--save-interval", "4",
                        "--save", str(ref / "ckpt"),
                        "--metrics-file", str(ref / "metrics.jsonl")], env=base_env(GPUS_PER_NODE=2),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = {row["iteration"]: row for row in _train_rows(ref / "metrics.jsonl")}

    save = tmp_path / "ckpt"
    job, out = sbatch(tmp_path, ["--save", str(save), "--load", str(save), "--train-iters", str(iters),
                                 "--save-interval", "4", "--metrics-file", str(tmp_path / "metrics.jsonl")], "lost_node")
    deadline = time.time() + 180
    while (latest_iteration(save) or 0) < 4:
        assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, \
            f"{job_state(job)}\n{log_of(out)[-3000:]}"
        time.sleep(0.1)
    killed_after = latest_iteration(save)
    t0 = time.time()
    r = tool("kill-node", "sd3node2")
    assert r.returncode == 0, r.stderr
    ranks_gone = left_running = None
    while left_running is None:
        if ranks_gone is None and not _ranks_on("sd3node1"):
            ranks_gone = time.time() - t0
        if job_state(job) != "RUNNING":
            left_running = time.time() - t0
        assert time.time() - t0 < 120, f"job {job} still RUNNING 120 s after the node was killed\n{diagnose(job)}"
        time.sleep(0.2)
    print(f"\nlost node: the surviving rank ended after {ranks_gone} s, the job left RUNNING after "
          f"{left_running:.1f} s ({job_state(job)}); last checkpoint at iteration {killed_after}")
    assert ranks_gone is not None and ranks_gone < 30, ranks_gone

    r = tool("revive-node", "sd3node2")
    assert r.returncode == 0, r.stderr
    # SLURM holds a requeued job for about two minutes (its BeginTime); an operator may release it
    deadline = time.time() + 120
    while job_state(job) != "PENDING":
        assert time.time() < deadline and job_state(job) in ("COMPLETING", "REQUEUED", "RUNNING", "CONFIGURING"), \
            f"{job_state(job)}\n{diagnose(job)}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=base_env(), check=True,
                   capture_output=True)
    state = wait_job(job, 300)
    log = log_of(out)
    assert state == "COMPLETED", f"job {job}: {state}\n{log[-4000:]}"
    assert "requeue 1 (SLURM_RESTART_COUNT)" in log, log[-4000:]
    rows = _train_rows(tmp_path / "metrics.jsonl")
    assert {row["iteration"] for row in rows} == set(range(1, iters + 1))
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at iteration (\d+)", log)]
    assert resumed and resumed[0] >= killed_after, log[-4000:]  # from the last checkpoint, not from scratch
    for row in rows:
        for k in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert row[k] == want[row["iteration"]][k], (row["iteration"], k)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_enable_ft_package_runs_ft_launcher_on_every_node(cluster, tmp_path):
    """`sbatch -N 2 launch.sh --enable-ft-package`: one ft_launcher per node through srun, c10d
    rendezvous on the first node, a rank monitor per rank; the job completes."""
    pytest.importorskip("nvidia_resiliency_ext")
    save = tmp_path / "ckpt"
    job, out = sbatch(tmp_path, ["--enable-ft-package", "--save", str(save), "--load", str(save),
                                 "--train-iters", str(SHORT_ITERS), "--save-interval", "1"], "two_node_ft")
    state = wait_job(job, 200)
    log = log_of(out)
    assert state == "COMPLETED", f"job {job}: {state}\n{log[-4000:]}"
    assert latest_iteration(save) == SHORT_ITERS, log[-4000:]
    assert log.count("-m nvidia_resiliency_ext.fault_tolerance.launcher") == 2, log[-4000:]
    assert log.count("--rdzv-endpoint=sd3node1:") == 2 and "section timeouts setup 600 s" in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_step_is_requeued_by_launch_sh_within_max_requeues(cluster, tmp_path):
    """A rank killed on the second node (not the node): srun ends the step with an error before
    SLURM sees anything wrong with the nodes, so launch.sh requeues the job itself (scontrol
    requeue); the requeued job resumes from the checkpoint. With MAX_REQUEUES=1, a second failure
    ends the job FAILED, and the log says why."""
    save = tmp_path / "ckpt"
    args = ["--save", str(save), "--load", str(save), "--train-iters", "400", "--save-interval", "2"]
    out = tmp_path / "requeue-%j.out"
    r = subprocess.run(["sbatch", "--parsable", "-N", "2", "--job-name=requeue", f"--output={out}",
                        f"--chdir={tmp_path}", str(LAUNCH), *args, *TRAIN_ARGS],
                       env=base_env(GPUS_PER_NODE=1, MAX_REQUEUES=1), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = Path(str(out).replace("%j", job))

    def kill_a_rank_after(iteration):
        deadline = time.time() + 180
        while (latest_iteration(save) or 0) < iteration or not _ranks_on("sd3node2"):
            assert time.time() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"{job_state(job)}\n{log_of(out)[-3000:]}"
            time.sleep(0.1)
        os.kill(int(_ranks_on("sd3node2")[0]), signal.SIGKILL)

    kill_a_rank_after(2)
    deadline = time.time() + 120
    while job_state(job) != "PENDING":
        assert time.time() < deadline, f"{job_state(job)}\n{diagnose(job)}"
        time.sleep(0.5)
    assert f"requeueing job {job} (1 of at most 1, MAX_REQUEUES)" in log_of(out), log_of(out)[-4000:]
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=base_env(), check=True,
                   capture_output=True)
    first = latest_iteration(save)
    kill_a_rank_after(first + 2)  # the requeued job has trained on from the checkpoint
    state = wait_job(job, 120)
    log = log_of(out)
    assert state == "FAILED", f"{state}\n{log[-4000:]}"
    assert "requeue 1 (SLURM_RESTART_COUNT)" in log and "resumed from" in log, log[-4000:]
    assert "was requeued 1 times already (MAX_REQUEUES=1): not again" in log, log[-4000:]
