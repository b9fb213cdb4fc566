"""Every path a run writes is checked before any process group starts (training/output_paths.py):
one line naming the flag, the path and why, a non-zero exit, no traceback, no step spent."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from megatron_sd3.training.output_paths import path_problem
from test_sync_free import _main  # pretrain_sd3.py's main in this process: (exit code, stderr)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--config", "configs/sd3_light_tiny.toml", "--mock-data", "--train-iters", "8"]


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


@pytest.mark.parametrize("flags, why", [
    (lambda f, d: ["--save", f"{f}/ckpt"], "is a regular file, so"),
    (lambda f, d: ["--save", str(f)], "is a file, not a directory"),
    (lambda f, d: ["--tensorboard-dir", f"{f}/tb/run1"], "is a regular file, so"),
    (lambda f, d: ["--metrics-file", str(d)], "is a directory, not a file"),
    (lambda f, d: ["--metrics-file", f"{f}/m.jsonl"], "is a regular file, so"),
    (lambda f, d: ["--wandb-project", "p", "--wandb-save-dir", f"{f}/wandb"], "is a regular file, so"),
])
def test_unwritable_path_is_one_line_before_any_work(flags, why, afile, tmp_path, capsys):
    argv = flags(afile, tmp_path)
    for check in (["--check-config"], []):  # the check alone, and a real run that must not start
        code, err = _main([*BASE, *argv, *check], capsys)
        line = _one_line(err)
        assert code == 2, err
        assert line.startswith("pretrain_sd3.py: error: " + argv[-2]) and why in line, line
        assert "give a path in a writable directory" in line, line
    assert afile.read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created, no step


def test_save_on_a_read_only_filesystem(tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a read-only tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        code, err = _main([*BASE, "--save", str(mnt / "ckpt"), "--check-config"], capsys)
        line = _one_line(err)
        assert code == 2 and f"--save {mnt / 'ckpt'}: cannot write in {mnt} (Read-only file system)" in line, line
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_no_permission_for_another_user():
    """Root writes anywhere; a plain user (nobody, through setpriv) cannot write in a 0555 folder."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("switching to another user needs root and setpriv")
    top = tempfile.mkdtemp(prefix="perm-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        locked = os.path.join(top, "locked")
        os.mkdir(locked, 0o555)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from megatron_sd3.training.output_paths import path_problem; "
                "print(path_problem(sys.argv[2], True)); print(path_problem(sys.argv[3], True))")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                            ROOT, os.path.join(locked, "ckpt"), top], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HOME=top))
        if r.returncode != 0 and "Permission denied" in r.stderr and "sys.path" not in r.stderr:
            pytest.skip(f"the interpreter is not readable by another user: {r.stderr.strip()[-200:]}")
        assert r.returncode == 0, r.stderr
        denied, top_problem = r.stdout.splitlines()
        assert denied == f"cannot write in {locked} (Permission denied)", r.stdout
        assert top_problem == f"cannot write in {top} (Permission denied)"  # 0755, owned by root
    finally:
        os.chmod(os.path.join(top, "locked"), 0o755)
        shutil.rmtree(top)


def test_writable_paths_pass_and_create_nothing(tmp_path):
    assert path_problem(str(tmp_path / "new" / "deeper" / "ckpt"), True) is None
    assert path_problem(str(tmp_path / "m.jsonl"), False) is None
    assert path_problem(str(tmp_path), True) is None
    assert list(tmp_path.iterdir()) == []


def test_launch_sh_says_it_once_and_starts_no_rank(afile, tmp_path):
    env = dict(os.environ, CONFIG="configs/sd3_light_tiny.toml", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    for k in ("SLURM_JOB_ID", "SLURM_NNODES", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    r = subprocess.run(["bash", "launch.sh", "--mock-data", "--train-iters", "8", "--save", f"{afile}/ckpt"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_line(r.stderr)
    assert f"--save {afile}/ckpt: {afile} is a regular file" in line, line
    assert "torchrun" not in r.stdout + r.stderr
