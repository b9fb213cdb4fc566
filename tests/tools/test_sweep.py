"""tools/sweep.py: a 2-cell grid run locally through launch.sh, killed mid-sweep and run
again (every cell completes, none is rerun before its last checkpoint), and the SLURM job array's
commands equal the local ones."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from _ranks import ROOT

SWEEP = os.path.join(ROOT, "tools", "sweep.py")
RUN = ["--config", "configs/sd3_light_tiny.toml", "--train-iters", "3", "--save-interval", "1", "--log-interval", "1",
       "--no-progress", "--lr-warmup-iters", "0", "--lr-decay-iters", "3"]


def _args(out):
    return [sys.executable, SWEEP, "--out", str(out), "--grid", "text_recon_gamma=0,0.5",
            "text_recon_target_layer=0,3", "--seeds", "2"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(GPUS_PER_NODE="1", LAUNCH_CHECK="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def test_cells_and_the_slurm_array_match_the_local_commands(tmp_path):
    local = subprocess.run([*_args(tmp_path), "--dry-run", "--", *RUN], capture_output=True, text=True, check=True)
    lines = local.stdout.strip().splitlines()
    # gamma 0 x {layer 0, 3} is one cell (the target layer has no effect at gamma 0), x 2 seeds; gamma 0.5 x 2 x 2
    assert len(lines) == 6
    assert sum("--text-recon-target-layer" in ln for ln in lines) == 4
    # seed by seed: a stopped sweep leaves whole seeds behind
    assert [int(ln.split("--seed ")[1].split()[0]) for ln in lines] == [1234] * 3 + [1235] * 3
    script = subprocess.run([*_args(tmp_path), "--slurm", "--dry-run", "--", *RUN], capture_output=True, text=True,
                            check=True).stdout
    assert "#SBATCH --array=0-5\n" in script
    exec_line = next(ln for ln in script.splitlines() if ln.startswith("exec "))
    for i, want in enumerate(lines):
        words = [w.replace("$SLURM_ARRAY_TASK_ID", str(i)) for w in shlex.split(exec_line[len("exec "):])]
        k = words.index("--")
        task = subprocess.run([*words[:k], "--dry-run", *words[k:]], capture_output=True, text=True, check=True)
        assert task.stdout.strip() == want, i
    bad = subprocess.run([*_args(tmp_path), "--", *RUN, "--save", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "sweep: error: --save is set per cell (OUT/CELL/...); drop it from the run arguments"]


def _iterations(cell_dir):
    with open(cell_dir / "metrics.jsonl") as fh:
        return [r["iteration"] for r in map(json.loads, fh) if r.get("type", "train") == "train"]


@pytest.mark.slow  # the default suite: the cells and the job array's commands (above)
@pytest.mark.timeout(600)
def test_a_killed_sweep_completes_with_the_same_command(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, SWEEP, "--out", str(out), "--grid", "text_recon_gamma=0,0.5", "--local", "--", *RUN]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    second = out / "text_recon_gamma=0.5__seed=1234" / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not second.exists():  # the first cell is done, the second has a checkpoint: kill the sweep
        assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:] if p.poll() is not None else ""
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    first = out / "text_recon_gamma=0__seed=1234"
    assert (first / "done").exists() and not (out / "text_recon_gamma=0.5__seed=1234" / "done").exists()
    killed_at = int(second.read_text())
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "text_recon_gamma=0__seed=1234: done, skipped" in r.stdout
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(cells) == 2 and all((out / c / "done").exists() for c in cells)
    assert cells == [f"text_recon_gamma={g}__seed=1234" for g in (0, 0.5)]
    assert _iterations(first) == [1, 2, 3]  # a finished cell is not run again
    resumed = _iterations(out / "text_recon_gamma=0.5__seed=1234")
    assert sorted(set(resumed)) == [1, 2, 3] and all(resumed.count(i) == 1 for i in range(1, killed_at + 1)), resumed
    for c in cells:  # each cell's own effective config
        assert json.loads((out / c / "checkpoints" / "effective_config.json").read_text())["seed"] == int(c[-4:])
