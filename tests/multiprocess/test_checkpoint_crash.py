"""Crash at any moment, run the same command again: the run continues bit-exact.

A PP=2 run (tiny preset, a checkpoint every 2 iterations, ``--save ck --load ck``: the SLURM
requeue pattern) gets one of its ranks SIGKILLed at seeded random moments (start-up, iterations,
saves), its launcher then stops the rest (as torchrun does), and the same command is started
again, many times; at the end every iteration logged by any of the runs must equal the
uninterrupted run's, bit for bit, and the checkpoint folder holds only complete checkpoints.
``--async-save`` (dist_checkpointing's asynchronous save) has the same guarantee.

The async variant and the long variant (more kills) are marked slow (``make test-all``).
"""
import os
import random
import re
import time

import pytest

from _jobs import Job, metrics_records

ITERS = 10
KEYS = ("loss", "denoise_loss", "text_recon_loss", "lr", "grad_norm", "consumed_samples", "skipped_iters")


def command(d, extra=()):
    ck = os.path.join(d, "ck")
    return ["--config", "configs/sd3_light_tiny.toml", "--pipeline-model-parallel-size", "2", "--log-interval", "1",
            "--no-progress", "--lr-decay-iters", "8", "--train-iters", str(ITERS), "--save-interval", "2",
            "--save", ck, "--load", ck, "--metrics-file", os.path.join(d, "metrics.jsonl"), *extra]


def phase(log: str) -> str:
    """Where rank 0 was when the kill came, from its log."""
    if "end of arguments" not in log:
        return "start-up (imports, process group)"
    its = [int(n) for n in re.findall(r"iteration\s+(\d+)/", log)]
    if not its:
        return "start-up (model, data, load)"
    n = its[-1]
    if n % 2 == 0 and f"iter_{n:07d}" not in log.split(f"iteration {n:8d}/")[-1]:
        return f"save of iteration {n}"
    return f"iteration {n + 1}"


def crash_and_requeue(tmp_path, kills, seed, extra=(), reach=2):
    ref_dir, work = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir()
    work.mkdir()
    with Job(command(str(ref_dir), extra), 2, str(ref_dir), "ref") as job:
        t0 = time.time()  # the ranks are started (forked ones with their imports done, as in the runs below)
        assert job.wait_for(r"iteration\s+1/", 400) is None, job.log(0)[-3000:] + job.log(1)[-3000:]
        t_start = time.time() - t0  # start-up: imports (fresh interpreters), process group, model, data
        assert job.wait(400) == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    t_full = time.time() - t0
    ref = {r["iteration"]: r for r in metrics_records(ref_dir / "metrics.jsonl")}
    assert sorted(ref) == list(range(1, ITERS + 1))
    iter_s = sorted(r["ms_per_iter"] for r in ref.values())[ITERS // 2] / 1000  # with its save

    rng = random.Random(seed)
    table = []
    for k in range(kills):
        # a seeded moment: a delay after the start (start-up, resume), or after rank 0 logged
        # iteration n (n even: its save runs then), so every phase is hit whatever the machine's load
        tracker = work / "ck" / "latest_checkpointed_iteration.txt"
        start = int(tracker.read_text()) if tracker.exists() else 0  # where the run will resume
        if start >= ITERS:
            break
        target = rng.choice(["start-up", "iteration", "save", "save"])
        if target == "iteration":  # a little past the resume point, so that several kills fit
            n = min(rng.randint(start + 1, start + reach), ITERS - 1)
        else:
            n = min(rng.choice(range(start + 2, start + 2 * reach + 1, 2)), ITERS)
        delay, rank = rng.uniform(0.0, 1.0), rng.randrange(2)
        with Job(command(str(work), extra), 2, str(work), f"run{k}") as job:
            if target == "start-up":
                codes = job.wait(delay * t_start)
            else:
                codes = job.wait_for(rf"iteration\s+{n}/", 400)
                codes = codes if codes is not None else job.wait(delay * iter_s)
            if codes is not None:
                assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
                table.append((k, target, n, "-", "exited before the kill (0)"))
                continue
            where = phase(job.log(0))
            os.kill(job.procs[rank].pid, 9)
            job.kill_all()  # the launcher stops the other rank
            table.append((k, target, n, rank, f"killed in {where}"))
    with Job(command(str(work), extra), 2, str(work), "last") as job:
        codes = job.wait(400)
        assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
        last_log = job.log(0)
    print(f"\nuninterrupted run {t_full:.1f}s (start-up {t_start:.1f}s); kills (run, aim, iteration, rank, outcome):")
    for row in table:
        print("  ", *row)

    records = metrics_records(work / "metrics.jsonl")
    assert {r["iteration"] for r in records} == set(range(1, ITERS + 1))
    for r in records:  # every logged iteration of every run, also those redone after a kill
        for key in KEYS:
            assert r[key] == ref[r["iteration"]][key], (r["iteration"], key, r[key], ref[r["iteration"]][key])
    ck = work / "ck"
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert not list(ck.glob("*.tmp")), sorted(p.name for p in ck.iterdir())
    assert "stopped: finished" in last_log or "resumed from" in last_log
    resumed = [int(m) for f in sorted(work.glob("*.rank0.log"))
               for m in re.findall(r"resumed from .* at iteration (\d+)", f.read_text())]
    assert any(it < ITERS for it in resumed), resumed  # some run continued from a checkpoint
    return table


@pytest.mark.timeout(900)
def test_random_kills_then_same_command_is_bit_exact(tmp_path):
    table = crash_and_requeue(tmp_path, kills=4, seed=3)
    assert sum(row[-1].startswith("killed") for row in table) >= 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_with_async_save(tmp_path):
    # an asynchronous save counts once finalised, iterations later: the kills aim further ahead
    table = crash_and_requeue(tmp_path, kills=6, seed=11, extra=("--async-save",), reach=4)
    assert sum(row[-1].startswith("killed") for row in table) >= 3


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("extra,reach", [((), 2), (("--async-save",), 4)])
def test_many_random_kills(tmp_path, extra, reach):
    # asynchronous saves count iterations later: kills aimed at most 2 ahead would never let one land
    crash_and_requeue(tmp_path, kills=30, seed=2024, extra=extra, reach=reach)
