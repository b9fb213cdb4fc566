"""launch.sh under a real single-node SLURM (tools/slurm_local.sh) and outside SLURM.

The SLURM tests need root and Debian's `slurmctld slurmd munge`; they start the local cluster
themselves (and stop it again if they started it). Without SLURM they skip, except under CI=true,
where a missing SLURM is a failure.

The entry launched is the real pretrain_sd3.py (tiny preset, synthetic data). A stand-in with the
same checkpoint and signal contract (tests/_launch_entry.py) can be put in ENTRY to test the
launcher alone.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.sh"
SLURM_LOCAL = ROOT / "tools" / "slurm_local.sh"

# ---- the entry under test: switch these to run the real pretrain_sd3.py ----------------------
ENTRY = ROOT / "pretrain_sd3.py"
STAND_IN = ENTRY.name == "_launch_entry.py"
# Extra flags for every run. The stand-in paces its iterations (so a job is still running when it
# is cancelled); the real entry needs synthetic data and a checkpoint every iteration.
ENTRY_ARGS = (["--iter-time", "0.2"] if STAND_IN
              else ["--mock-data", "--log-interval", "1", "--save-interval", "1", "--lr-warmup-iters", "1"])
# Preset passed through CONFIG= (launch.sh's default is configs/sd3_light_tiny.toml).
CONFIG = "" if STAND_IN else str(ROOT / "configs" / "sd3_light_tiny.toml")
# Megatron's pointer to the newest complete checkpoint in --save.
LATEST_FILE = "latest_checkpointed_iteration.txt"
# Iterations of a job that is cancelled midway (never reached) and of a short job.
LONG_ITERS = 100000
SHORT_ITERS = 3

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def latest_iteration(save: Path):
    f = save / LATEST_FILE
    if not f.exists():
        return None
    text = f.read_text().strip()
    return int(text) if text.isdigit() else None


def events(save: Path):
    f = save / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    for k in ("NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "EXTRA_ARGS",
              "LAUNCH_SRUN", "LAUNCH_STAGE", "LAUNCH_ROOT", "LAUNCH_CHECK", "LAUNCH_CHECKED"):
        env.pop(k, None)
    env.update(ENTRY=str(ENTRY), CONFIG=CONFIG, PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def expected_world_size():
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return n if n > 0 else 2


def test_launch_sh_syntax_and_header():
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True)
    head = LAUNCH.read_text().split("set -euo pipefail")[0]
    for var in ("NNODES", "GPUS_PER_NODE", "MASTER_PORT", "CONFIG", "PYTHON", "ENTRY", "EXTRA_ARGS",
                "LAUNCH_DRY_RUN", "CONTAINER_IMAGE", "CONTAINER_MOUNTS"):
        assert var in head, f"{var} not documented in launch.sh's header"
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal="):
        assert line in head
    assert "#SBATCH --exclusive" not in head


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_run_two_cpu_ranks(tmp_path):
    """`bash launch.sh` outside SLURM: torchrun on this machine, 2 CPU ranks without a GPU."""
    save = tmp_path / "ckpt"
    env = base_env(EXTRA_ARGS=f"--save-interval {SHORT_ITERS}" if STAND_IN else "")
    r = subprocess.run(["bash", str(LAUNCH), "--save", str(save), "--train-iters", str(SHORT_ITERS),
                        *ENTRY_ARGS], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert latest_iteration(save) == SHORT_ITERS
    assert "--standalone" in r.stderr
    if STAND_IN:
        checks = [e for e in events(save) if e["event"] == "check"]
        assert [e["world_size"] for e in checks] == [expected_world_size()], checks
    else:
        assert r.stderr.count("checks passed") == 1, r.stderr
    if STAND_IN:
        starts = [e for e in events(save) if e["event"] == "start"]
        assert sorted(e["rank"] for e in starts) == list(range(expected_world_size()))
        assert all(e["world_size"] == expected_world_size() for e in starts)
        assert all(e["slurm_job"] is None for e in starts)
        # EXTRA_ARGS come before the caller's arguments.
        argv = starts[0]["argv"]
        assert argv.index("--save-interval") < argv.index("--save")


def _launch_real(tmp_path, args, timeout=170, **env):
    """launch.sh with the real entry, whatever ENTRY above says."""
    e = base_env(ENTRY=str(ROOT / "pretrain_sd3.py"), CONFIG=str(ROOT / "configs" / "sd3_light_tiny.toml"),
                 **env)
    return subprocess.run(["bash", str(LAUNCH), *args], env=e, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("args, message", [
    (["--train-iter", "3"], "unrecognized arguments: --train-iter (did you mean --train-iters?)"),
    # the same one check before torchrun: the other two kinds of bad input are second variants
    pytest.param(["--tensor-model-parallel-size", "4"], "world size 2 is not divisible by TP x PP",
                 marks=pytest.mark.slow),
    pytest.param(["--data-path", "/nonexistent/data"], "manifest /nonexistent/data/manifest.json: missing",
                 marks=pytest.mark.slow),
], ids=["misspelt-flag", "layout", "data-path"])
def test_bad_input_through_launch_sh_is_one_line(tmp_path, args, message):
    """The entry's checks run once before torchrun: one error line, no usage dump, no per-rank
    copies, no torchrun traceback, and torchrun never starts."""
    r = _launch_real(tmp_path, [*args, "--train-iters", "8"], GPUS_PER_NODE=2)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "usage:" not in r.stderr and "Traceback" not in r.stderr
    assert "torch.distributed.run" not in r.stderr and not r.stdout.strip()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks, args", [
    # the demo itself (make demo, PP=2 through launch.sh) is held quiet by test_conditional.py
    pytest.param(2, ["--pipeline-model-parallel-size", "2"], marks=pytest.mark.slow),
    pytest.param(1, ["--fp8-format", "hybrid", "--fp8-gemms", "all"], marks=pytest.mark.slow),  # torchao's FP8 GEMMs
], ids=["demo-pp2", "fp8"])
def test_demo_run_is_quiet(tmp_path, ranks, args):
    """The demo through launch.sh: no warning on stderr from any rank (megatron's TE/apex fallbacks,
    torchao's extensions, torch's pytree notices, torchrun's OMP banner); the arguments block says
    once whether Transformer Engine and apex are installed."""
    r = _launch_real(tmp_path, [*args, "--train-iters", "3", "--lr-warmup-iters", "1", "--mock-data",
                                "--save", str(tmp_path / "ckpt"), "--no-progress"],
                     timeout=380, GPUS_PER_NODE=ranks)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    noisy = [line for line in r.stderr.splitlines()
             if not line.startswith(("launch.sh: ", "pretrain_sd3.py: checks passed"))]
    assert not noisy, "\n".join(noisy[:40])
    assert r.stdout.count("-- environment --") == 1, r.stdout  # the report of launch.sh's checks
    arguments = r.stdout[r.stdout.index("-- arguments --"):r.stdout.index("end of arguments")]
    assert sum("Transformer Engine" in line for line in arguments.splitlines()) == 1, r.stdout
    assert "stopped: finished at iteration 3/3" in r.stdout


# ---- SLURM ------------------------------------------------------------------------------------


def _need(reason):
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "squeue")
               if shutil.which(b) is None]
    if missing:
        _need(f"SLURM not installed ({', '.join(missing)} missing): "
              "apt-get install -y --no-install-recommends slurmctld slurmd munge")
    if os.geteuid() != 0:
        _need("the local SLURM cluster (tools/slurm_local.sh) must be started as root")
    env = base_env()
    conf = subprocess.run(["bash", str(SLURM_LOCAL), "env"], env=env, capture_output=True,
                          text=True, check=True).stdout.split("=", 1)[1].strip()
    already = subprocess.run(["bash", str(SLURM_LOCAL), "status"], env=env,
                             capture_output=True).returncode == 0
    if not already:
        r = subprocess.run(["bash", str(SLURM_LOCAL), "start"], env=env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            pytest.fail(f"tools/slurm_local.sh start failed:\n{r.stdout}\n{r.stderr}")
    yield conf
    if not already:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, capture_output=True, timeout=60)


def slurm_env(conf, **extra):
    return base_env(SLURM_CONF=conf, **extra)


def sbatch(conf, tmp_path, args, name, **extra):
    out = tmp_path / f"{name}-%j.out"
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={out}",
                        f"--chdir={tmp_path}", str(LAUNCH), *args, *ENTRY_ARGS],
                       env=slurm_env(conf, **extra), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, Path(str(out).replace("%j", job))


def job_state(conf, job):
    r = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm_env(conf),
                       capture_output=True, text=True)
    for field in r.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def wait_job(conf, job, timeout):
    """Wait until squeue no longer lists the job (a cancelled job stays listed, COMPLETING, while
    its processes still run), then return its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm_env(conf),
                           capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return job_state(conf, job)
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=slurm_env(conf))
    raise AssertionError(f"job {job} still {job_state(conf, job)} after {timeout}s")


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def log_of(path):
    return path.read_text()[-4000:] if path.exists() else "(no job output)"


@pytest.mark.timeout(120)
@pytest.mark.slow  # the default suite: the scancel test's second job and the two-node job (srun)
@pytest.mark.parametrize("mode", ["direct", "srun"])
def test_sbatch_job_completes_and_saves(slurm, tmp_path, mode):
    """`sbatch launch.sh ...` runs to the end and leaves a checkpoint. `srun` forces the
    multi-node path (one torchrun per node through srun) on our single node."""
    save = tmp_path / "ckpt"
    job, out = sbatch(slurm, tmp_path, ["--save", str(save), "--train-iters", str(SHORT_ITERS)],
                      f"launch_{mode}", LAUNCH_SRUN=int(mode == "srun"))
    state = wait_job(slurm, job, 100)
    assert state == "COMPLETED", f"job {job}: {state}\n{log_of(out)}"
    assert latest_iteration(save) == SHORT_ITERS, log_of(out)
    log = out.read_text()
    assert ("srun --nodes=1" in log) == (mode == "srun"), log
    assert "--master-addr=localhost" in log and f"--master-port={20000 + int(job) % 20000}" in log
    if STAND_IN:
        starts = [e for e in events(save) if e["event"] == "start"]
        assert {e["slurm_job"] for e in starts} == {job}
        assert sorted(e["rank"] for e in starts) == list(range(expected_world_size()))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", [pytest.param([], marks=pytest.mark.slow), ["--batch", "--signal=TERM"]],
                         ids=["scancel", "scancel-batch-TERM"])
def test_scancel_saves_and_second_job_resumes(slurm, tmp_path, how):
    """A running job is cancelled (plain `scancel`, or the recommended
    `scancel --batch --signal=TERM`): the ranks get SIGTERM, save, and a second job with --load
    resumes from that checkpoint and finishes."""
    save = tmp_path / "ckpt"
    job, out = sbatch(slurm, tmp_path, ["--save", str(save), "--train-iters", str(LONG_ITERS),
                                        "--exit-signal-handler"],
                      "launch_cancel")
    wait_for(lambda: (latest_iteration(save) or 0) >= 2 or job_state(slurm, job) not in
             ("PENDING", "RUNNING", "CONFIGURING"), 90, "the first checkpoint")
    assert job_state(slurm, job) == "RUNNING", log_of(out)
    subprocess.run(["scancel", *how, job], env=slurm_env(slurm), check=True)
    t0 = time.time()
    state = wait_job(slurm, job, 60)
    # Plain scancel: CANCELLED. --batch --signal=TERM: the job ends by itself once the ranks have
    # saved; torchrun exits non-zero after a SIGTERM, so SLURM reports FAILED.
    assert state in ("CANCELLED", "FAILED", "COMPLETED"), state
    assert time.time() - t0 < 30, "ranks did not exit before SLURM's KillWait (SIGKILL)"
    stopped_at = latest_iteration(save)
    assert stopped_at is not None and stopped_at < LONG_ITERS, log_of(out)
    if STAND_IN:
        ev = events(save)
        exits = [e for e in ev if e["event"] == "exit_signal"]
        assert sorted(e["rank"] for e in exits) == list(range(expected_world_size())), log_of(out)
        assert {e["iteration"] for e in exits} == {stopped_at}
        assert not [e for e in ev if e["event"] == "done"]

    target = stopped_at + SHORT_ITERS
    job2, out2 = sbatch(slurm, tmp_path, ["--save", str(save), "--load", str(save),
                                          "--train-iters", str(target), "--exit-signal-handler"],
                        "launch_resume")
    state2 = wait_job(slurm, job2, 100)
    assert state2 == "COMPLETED", f"job {job2}: {state2}\n{log_of(out2)}"
    assert latest_iteration(save) == target, log_of(out2)
    if STAND_IN:
        starts = [e for e in events(save) if e["event"] == "start" and e["slurm_job"] == job2]
        assert starts and all(e["iteration"] == stopped_at for e in starts), starts
        done = [e for e in events(save) if e["event"] == "done"]
        assert {e["iteration"] for e in done} == {target}


def _train_losses(metrics: Path):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in rows if r.get("type", "train") == "train"]


@pytest.mark.slow  # the cells test_sweep.py runs locally, as one SLURM job array
@pytest.mark.timeout(600)
def test_sweep_job_array_runs_every_cell_as_the_local_sweep_does(slurm, tmp_path):
    """`tools/sweep.py --slurm` submits one array task per cell; each runs its cell through
    launch.sh and ends COMPLETED, and every cell's losses equal the same sweep's `--local` run."""
    import sys

    sweep = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--grid", "text_recon_gamma=0,0.5", "--seeds", "2"]
    run = ["--", "--config", CONFIG or str(ROOT / "configs" / "sd3_light_tiny.toml"), *ENTRY_ARGS,
           "--train-iters", str(SHORT_ITERS), "--no-progress"]
    env = slurm_env(slurm, GPUS_PER_NODE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([*sweep, "--out", str(tmp_path / "array"), "--slurm", *run], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Submitted batch job" in r.stdout, r.stdout + r.stderr
    job = r.stdout.split()[-1]
    state = wait_job(slurm, job, 480)
    tasks = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm_env(slurm), capture_output=True,
                           text=True).stdout.splitlines()
    logs = "\n".join(log_of(p) for p in sorted((tmp_path / "array").glob("slurm-*.out")))
    assert len(tasks) == 4 and all("JobState=COMPLETED" in t for t in tasks), f"{state}\n{tasks}\n{logs}"
    local = subprocess.run([*sweep, "--out", str(tmp_path / "local"), "--local", *run], cwd=ROOT,
                           env=base_env(GPUS_PER_NODE="1", OMP_NUM_THREADS="1", LAUNCH_CHECK="0"),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    cells = json.loads((tmp_path / "array" / "sweep.json").read_text())["cells"]
    assert cells == json.loads((tmp_path / "local" / "sweep.json").read_text())["cells"] and len(cells) == 4
    for c in cells:
        assert (tmp_path / "array" / c / "done").exists(), logs
        got = _train_losses(tmp_path / "array" / c / "metrics.jsonl")
        assert [i for i, _ in got] == list(range(1, SHORT_ITERS + 1)), c
        assert got == _train_losses(tmp_path / "local" / c / "metrics.jsonl"), c


# ---- LAUNCH_DRY_RUN and CONTAINER_IMAGE (pyxis) -----------------------------------------------

def _dry_run_commands(stdout: str) -> dict:
    """LAUNCH_DRY_RUN's output: {comment: [argv of the command below it]}."""
    import shlex

    lines = [line for line in stdout.splitlines() if line.strip()]
    out = {}
    for comment, cmd in zip(lines[::2], lines[1::2]):
        assert comment.startswith("# ") and not cmd.startswith("#"), stdout
        out[comment[2:]] = shlex.split(cmd)
    return out


def _stand_in_env(**extra):
    return base_env(ENTRY=str(ROOT / "tests" / "_launch_entry.py"), CONFIG="", **extra)


@pytest.mark.timeout(60)
def test_dry_run_outside_slurm_prints_the_commands_and_starts_nothing(tmp_path):
    save = tmp_path / "ckpt"
    r = subprocess.run(["bash", str(LAUNCH), "--save", str(save), "--train-iters", "3"], cwd=tmp_path,
                       env=_stand_in_env(LAUNCH_DRY_RUN=1, GPUS_PER_NODE=2), capture_output=True, text=True,
                       timeout=50)
    assert r.returncode == 0, r.stderr
    cmds = _dry_run_commands(r.stdout)
    check, ranks = list(cmds.values())
    assert check[:2] == ["env", "WORLD_SIZE=2"] and "--check-config" in check, cmds
    assert "torch.distributed.run" in ranks and "--nproc-per-node=2" in ranks and "--standalone" in ranks
    assert ranks[-4:] == [str(ROOT / "tests" / "_launch_entry.py"), "--save", str(save), "--train-iters", "3"][-4:]
    assert not save.exists() and not r.stderr.strip(), r.stderr  # nothing ran: no check, no rank
    # a container needs SLURM's pyxis: outside SLURM that is one line, and nothing starts
    r = subprocess.run(["bash", str(LAUNCH), "--save", str(save)], cwd=tmp_path,
                       env=_stand_in_env(CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.12-py3"),
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pyxis" in r.stderr, r.stderr
    assert not save.exists() and not r.stdout.strip()


def _sbatch_dry_run(slurm, tmp_path, name, **extra):
    save = tmp_path / "ckpt"
    env = slurm_env(slurm, ENTRY=str(ROOT / "tests" / "_launch_entry.py"), CONFIG="", LAUNCH_DRY_RUN=1,
                    GPUS_PER_NODE=2, **extra)
    out = tmp_path / f"{name}.out"
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={out}", f"--chdir={tmp_path}",
                        str(LAUNCH), "--save", str(save), "--train-iters", "3"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    assert wait_job(slurm, job, 60) == "COMPLETED", log_of(out)
    assert not save.exists(), log_of(out)  # no rank started (the stand-in saves at once)
    text = out.read_text()
    return _dry_run_commands("\n".join(line for line in text.splitlines()
                                       if not line.startswith("launch.sh: "))), job


@pytest.mark.timeout(150)
def test_dry_run_in_slurm_with_and_without_a_container(slurm, tmp_path):
    """Inside the local SLURM allocation (sbatch): without CONTAINER_IMAGE the batch step runs
    torchrun itself, as before; with it, one srun step per node carries pyxis' options (the repo
    and the working directory mounted at the same paths, CONTAINER_MOUNTS added, started in the
    working directory), and the checks and ranks use the container's python."""
    plain = tmp_path / "plain"
    plain.mkdir()
    cmds, job = _sbatch_dry_run(slurm, plain, "dry_plain")
    check, ranks = list(cmds.values())
    assert check[:2] == ["env", "WORLD_SIZE=2"] and check[2] == str(ROOT / ".venv" / "bin" / "python"), check
    assert "torch.distributed.run" in ranks and "--node-rank=0" in ranks and "--nproc-per-node=2" in ranks
    assert "--master-port=" + str(20000 + int(job) % 20000) in ranks, ranks
    assert not [k for k in cmds if "srun" in k], cmds

    work = tmp_path / "container"
    work.mkdir()
    cmds, job = _sbatch_dry_run(slurm, work, "dry_container", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.12-py3",
                                   CONTAINER_MOUNTS="/data:/data")
    keys = list(cmds)
    srun = cmds[keys[0]]
    assert keys[0].startswith("the srun step") and srun[0] == "srun", cmds
    assert "--container-image=nvcr.io#nvidia/pytorch:25.12-py3" in srun
    assert f"--container-mounts={ROOT}:{ROOT},{work}:{work},/data:/data" in srun, srun
    assert f"--container-workdir={work}" in srun and "--ntasks-per-node=1" in srun
    assert srun[srun.index("bash"):][:2] == ["bash", str(LAUNCH)] and srun[-4:] == ["--save", str(work / "ckpt"),
                                                                                   "--train-iters", "3"]
    check = cmds[keys[1]]
    assert check[:3] == ["env", "WORLD_SIZE=2", "python"] and "--check-config" in check, check
    ranks = cmds[keys[2]]
    assert "in the container" in keys[2] and ranks[0] == "python" and "--node-rank=0" in ranks, ranks
    assert "--master-port=" + str(20000 + int(job) % 20000) in ranks, ranks


@pytest.mark.timeout(150)
def test_container_job_runs_through_one_srun_step(slurm, tmp_path):
    """A real job with CONTAINER_IMAGE. pyxis is not on this machine: an `srun` first on PATH stands
    in for it, recording the --container-* options it gets and running the real srun without them.
    The one-node job goes through the srun step (not torchrun in the batch shell), the node checks
    and runs the ranks there, and the job completes with its checkpoint."""
    real_srun = shutil.which("srun")
    shim_dir, log = tmp_path / "pyxis", tmp_path / "pyxis.log"
    shim_dir.mkdir()
    (shim_dir / "srun").write_text(
        "#!/usr/bin/env bash\nargs=()\nfor a in \"$@\"; do case $a in --container-*) echo \"$a\" >> "
        f"{log};; *) args+=(\"$a\");; esac; done\nexec {real_srun} \"${{args[@]}}\"\n")
    (shim_dir / "srun").chmod(0o755)
    save = tmp_path / "ckpt"
    env = slurm_env(slurm, ENTRY=str(ROOT / "tests" / "_launch_entry.py"), CONFIG="", GPUS_PER_NODE=1,
                    CONTAINER_IMAGE="/images/megatron_sd3.sqsh", PYTHON=str(ROOT / ".venv" / "bin" / "python"),
                    PATH=f"{shim_dir}:{os.environ['PATH']}")
    out = tmp_path / "job.out"
    r = subprocess.run(["sbatch", "--parsable", "--job-name=container", f"--output={out}", f"--chdir={tmp_path}",
                        str(LAUNCH), "--save", str(save), "--train-iters", "3", "--iter-time", "0.05"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert wait_job(slurm, r.stdout.strip().split(";")[0], 120) == "COMPLETED", log_of(out)
    assert latest_iteration(save) == 3, log_of(out)
    assert log.read_text().split() == ["--container-image=/images/megatron_sd3.sqsh",
                                       f"--container-mounts={ROOT}:{ROOT},{tmp_path}:{tmp_path}",
                                       f"--container-workdir={tmp_path}"], log_of(out)
    checks = [e for e in events(save) if e["event"] == "check"]
    assert len(checks) == 1, checks  # on the node, in the step (node 0 of 1)
    assert "launch.sh: srun " in out.read_text()
