"""tools/gpu_check.sh, the one GPU call: its plan (order, rows, budget) and, on CPU, its log."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from _ranks import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
BUDGET = 480  # the script's default: one device call of at most 8 minutes
FIRST = ["fp8_pays", "fp8_pays_2432", "fp8_train_tracking"]  # the most valuable, in this order


def _run(tmp_path, *args, timeout):
    """The script in a session of its own, killed whole (its steps too) if it outlives ``timeout``."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    p = subprocess.Popen(["bash", SCRIPT, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:  # whatever of its group is left (a step outliving bash) ends with it
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _starts(log: str):
    """(seconds into the script, step, limit, command) of each START line."""
    pat = re.compile(r"^\[\S+ \+\s*(\d+)s\] START (\S+) \(limit (\d+)s\): (.*)$")
    return [(int(m[1]), m[2], int(m[3]), m[4]) for m in map(pat.match, log.splitlines()) if m]


@pytest.mark.timeout(120)
def test_the_gpu_plan_measures_what_fp8_buys_first_and_fits_one_call(tmp_path):
    """--dry-run prints the GPU plan: bf16 against FP8 (rule and all) at 1024 px, micro batch 4,
    compiled, for sd3_light's width and SD3.5-large's 2432, then FP8 loss tracking over 50 steps,
    before anything else; the three fit the default budget together with the start-up before them,
    and every bench step appends its rows to the one log (rows.jsonl) as they complete."""
    r = _run(tmp_path, "--dry-run", timeout=100)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    starts = _starts(r.stdout)
    assert [s[1] for s in starts[:3]] == FIRST, [s[1] for s in starts]
    (t0, _, l1, pays), (_, _, l2, wide), (_, _, l3, track) = starts[:3]
    assert t0 + l1 + l2 + l3 <= BUDGET
    for cmd in (pays, wide):
        assert "tools/bench_throughput.py --preset sd3_light" in cmd
        assert "--resolution 1024 --micro-batch-size 4" in cmd and "--compile on" in cmd
        assert "--variants bf16 fp8-rule fp8-local " in cmd
        assert "--rows-jsonl " + str(tmp_path / "out" / "rows.jsonl") in cmd
    assert "--hidden-size" not in pays and "--hidden-size 2432" in wide
    assert "tests/_fp8_train_worker.py --preset sd3_light" in track and "--steps 50" in track
    assert "--fp8 hybrid --bf16 --ref bf16" in track
    assert all(s[2] <= BUDGET for s in starts)


@pytest.mark.slow  # the CPU run of the same chain (90 s); the plan itself is tested above
@pytest.mark.timeout(400)
def test_on_cpu_the_chain_writes_every_row_to_one_log(tmp_path):
    """Without CUDA the script runs steps 2-4 on the tiny preset: rows.jsonl holds each bench row
    (tagged with its step, with planned and measured time and memory) and the tracking summary."""
    r = _run(tmp_path, timeout=380)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    bench = [(row["tag"], row["variant"]) for row in rows if "variant" in row]
    assert bench == [(tag, v) for tag in FIRST[:2] for v in ("fp32", "fp8-rule", "fp8-local")]
    for row in rows[:6]:
        assert row["ms_per_iter"] > 0 and row["planned_ms"] > 0 and row["planned_mem_GiB"] > 0
    for row in rows[:3]:  # step 2 profiles its rows: the GPU's idle time and its causes
        assert row["kernel_time"]["kernels_per_iter"] > 10
    (track,) = [row for row in rows if row["tag"] == "fp8_train_tracking"]
    assert track["passed"] and track["scaled_mm_calls"] > 0 and len(track["loss"]) == 5
    assert "FP8 vs bf16 loss tracking (fp8_train_tracking)" in r.stdout
    assert "fp8-rule vs bf16 at 64 px, hidden 64:" in r.stdout
    assert "kernel launches and None host syncs per iteration" in r.stdout  # no CUDA: no sync count
