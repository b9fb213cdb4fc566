"""Checkpoint integrity: every checkpoint records its files' sizes and checksums; a truncated or
corrupt file is named in one line before anything is loaded, with the newest good checkpoint;
``--ckpt-step N`` loads an older one; what an interrupted save left never blocks a restart."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from _jobs import ENTRY, metrics_records
from _ranks import ROOT, run_script

from megatron_sd3.training import checkpointing as ckpt

BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8"]


def run1(args, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return run_script(ENTRY, [*BASE, *args], env=env, cwd=ROOT, timeout=timeout)


def one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 iterations, a checkpoint at 2 and at 4."""
    d = tmp_path_factory.mktemp("integrity")
    r = run1(["--train-iters", "4", "--save-interval", "2", "--save", str(d / "ck"),
              "--metrics-file", str(d / "m.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _copy(src: Path, dst: Path):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_every_file_is_recorded(trained):
    for it in (2, 4):
        d = trained / "ck" / f"iter_{it:07d}"
        rec = json.loads((d / ckpt.INTEGRITY).read_text())
        assert rec["iteration"] == it
        on_disk = sorted(p.name for p in d.iterdir() if p.name != ckpt.INTEGRITY)
        assert sorted(rec["files"]) == on_disk and "common.pt" in on_disk and "metadata.json" in on_disk
        for name, f in rec["files"].items():
            assert f["size"] == (d / name).stat().st_size and len(f["sha256"]) == 64


def test_truncated_file_is_named_with_the_newest_good_one(trained, tmp_path):
    ck = _copy(trained / "ck", tmp_path / "ck")
    shard = max((ck / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    line = one_error_line(run1(["--train-iters", "6", "--load", str(ck)]))
    assert f"iter_0000004/{shard.name} is {size // 2} bytes, {size} were written" in line, line
    assert "the newest good checkpoint there is iteration 2: load it with --ckpt-step 2" in line, line


def test_corrupt_file_is_named_before_loading(trained, tmp_path):
    ck = _copy(trained / "ck", tmp_path / "ck")
    f = ck / "iter_0000004" / "common.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    f.write_bytes(bytes(data))
    line = one_error_line(run1(["--train-iters", "6", "--load", str(ck)]))
    assert "common.pt does not match its recorded checksum (corrupt)" in line, line
    assert "--ckpt-step 2" in line, line


def test_ckpt_step_loads_an_older_checkpoint_bit_exact(trained, tmp_path):
    ck = _copy(trained / "ck", tmp_path / "ck")
    m = tmp_path / "m.jsonl"
    r = run1(["--train-iters", "4", "--load", str(ck), "--ckpt-step", "2", "--metrics-file", str(m)])
    assert r.returncode == 0 and "resumed from" in r.stdout and "iter_0000002 at iteration 2" in r.stdout, \
        r.stderr[-3000:]
    ref = {x["iteration"]: x for x in metrics_records(trained / "m.jsonl")}
    got = {x["iteration"]: x for x in metrics_records(m)}
    assert sorted(got) == [3, 4]
    for it in (3, 4):
        assert got[it]["loss"] == ref[it]["loss"] and got[it]["lr"] == ref[it]["lr"]
    line = one_error_line(run1(["--train-iters", "4", "--load", str(ck), "--ckpt-step", "3"]))
    assert "--ckpt-step 3: no iter_0000003/" in line and "(saved iterations: 2, 4)" in line, line


def test_truncated_file_without_a_record_is_one_line(trained, tmp_path):
    """A checkpoint written before files were recorded: a truncated common.pt is still one line."""
    ck = _copy(trained / "ck", tmp_path / "ck")
    d = ck / "iter_0000004"
    (d / ckpt.INTEGRITY).unlink()
    with open(d / "common.pt", "r+b") as fh:
        fh.truncate(100)
    line = one_error_line(run1(["--train-iters", "6", "--load", str(ck)]))
    assert "cannot read common.pt" in line, line


def test_interrupted_first_save_does_not_block_the_restart(tmp_path):
    """What a kill during the first save leaves: ``iter_*.tmp`` (and a renamed iter dir whose
    ``latest`` was never written), no ``latest``. The same command starts fresh, says so in one
    line, and its save removes the leftovers."""
    ck = tmp_path / "ck"
    (ck / "iter_0000002.tmp").mkdir(parents=True)
    (ck / "iter_0000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (ck / "iter_0000010").mkdir()
    (ck / "iter_0000010" / "common.pt").write_bytes(b"never named by latest")
    same = ["--train-iters", "2", "--save-interval", "2", "--save", str(ck), "--load", str(ck)]
    r = run1(same)
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stdout.splitlines() if "starting from scratch" in ln]
    assert len(notes) == 1 and "iter_0000002.tmp" in notes[0] and "iter_0000010" in notes[0], r.stdout[-2000:]
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000002"]
    assert ckpt.read_latest(ck) == 2
    # with --load elsewhere (not the save folder) the same leftovers are an error, in one line
    (ck / "iter_0000004.tmp").mkdir()
    (ck / ckpt.LATEST).unlink()
    line = one_error_line(run1(["--train-iters", "2", "--load", str(ck)]))
    assert "no save there completed" in line, line


def test_untracked_newer_iteration_is_ignored(tmp_path):
    """An iter dir newer than ``latest`` (killed between the rename and the tracker) is not loaded."""
    ck = tmp_path / "ck"
    good = ck / "iter_0000002"
    good.mkdir(parents=True)
    for name in ("metadata.json", "common.pt"):
        (good / name).write_text("x")
    (ck / "iter_0000004").mkdir()
    (ck / ckpt.LATEST).write_text("2")
    assert ckpt.resolve_load(str(ck), str(ck)) == good
    assert ckpt.resolve_load(str(ck), None, ckpt_step=2) == good


def test_weights_without_optimizer_state_reach_the_fp32_masters(tmp_path):
    """A weights-only checkpoint (or --no-load-optim) under bf16: the optimizer's fp32 master
    copies take the loaded weights (else the first step would write the old ones back)."""
    from _ranks import run_ranks

    logs = run_ranks("tests/_reload_worker.py", 1, [str(tmp_path / "ck")], timeout=240)
    assert "masters equal the loaded weights" in logs[0]


@pytest.mark.timeout(300)
def test_saving_and_loading_leave_no_openmp_threads_behind(tmp_path):
    """One CPU process with two intra-op threads: the save's and the load's collectives (and an
    async save's finalisation) must not start an OpenMP team on gloo's worker threads: it would
    outlive them, and with more OpenMP threads than cores libgomp lets every later iteration run
    about twice as slow. Broken on purpose (checkpointing.serial_collectives a no-op): save
    69 -> 71 threads, load 67 -> 68, async save 69 -> 70 and its finalisation 70 -> 71 (one run
    saves asynchronously, a second resumes from it and saves)."""
    from _ranks import run_ranks

    ck = str(tmp_path / "ck")
    counts = []
    for name, args in (("async", ["--save", ck, "--async-save", "--train-iters", "2"]),
                       ("resumed", ["--save", ck, "--load", ck, "--train-iters", "3"])):
        out = str(tmp_path / f"{name}.json")
        run_ranks("tests/_omp_threads_worker.py", 1, [out, *BASE, *args], timeout=240)
        counts += json.load(open(out))
    assert [c[0] for c in counts] == ["save_checkpoint", "_finalize", "load_checkpoint", "save_checkpoint"], counts
    for name, before, after in counts:
        assert after == before, (name, before, after)
