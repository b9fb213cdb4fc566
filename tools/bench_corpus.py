#!/usr/bin/env python
"""How the data path scales with the corpus and the ranks, as two ratios:

1. preprocessing: images/s of ``tools/preprocess_data.py`` over webdataset tars with the tiny SD3
   encoders (tests/_data_fixtures.py: the real encoder classes, a few layers wide) on 1 and on 2
   ranks (one thread each), and the ratio of the two: near 2 means the tar-per-unit split scales;
2. training start-up: wall time and peak resident memory of ``pretrain_sd3.py`` (tiny preset, one
   process, one iteration) on a cached dataset of 10 000 samples against one of 1 000: near 1 means
   nothing but the manifest grows with the corpus.

    python tools/bench_corpus.py [--tars 8 --per-tar 12] [--small 1000 --large 10000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _run(cmds):
    """Start the commands together; wall seconds, the peak RSS (MiB, from wait4) and the stderr of each."""
    t0 = time.perf_counter()
    logs = [tempfile.TemporaryFile() for _ in cmds]
    procs = [subprocess.Popen(c, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f) for (c, e), f in zip(cmds, logs)]
    rss, errs = [], []
    for p, f in zip(procs, logs):
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        f.seek(0)
        errs.append(f.read().decode(errors="replace"))
        if p.returncode:
            raise SystemExit(f"bench_corpus: {' '.join(map(str, cmds[0][0][:3]))} failed: {errs[-1][-2000:]}")
        rss.append(usage.ru_maxrss / 1024)
    return time.perf_counter() - t0, rss, errs


def make_tars(root: Path, n_tars: int, per_tar: int) -> str:
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for t in range(n_tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            for j in range(per_tar):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, size=(64, 64, 3)).astype(np.uint8)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a test image {t} {j}".encode())):
                    info = tarfile.TarInfo(f"{t:05d}{j:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return f"{root}/{{00000..{n_tars - 1:05d}}}.tar"


def bench_preprocess(tmp: Path, n_tars: int, per_tar: int) -> dict:
    from _data_fixtures import build_tiny_sd3_encoders

    enc = build_tiny_sd3_encoders(tmp / "sd3")
    pattern = make_tars(tmp / "tars", n_tars, per_tar)
    n = n_tars * per_tar
    rates = {}
    for world in (1, 2):
        out = tmp / f"out{world}"
        cmd = [sys.executable, "tools/preprocess_data.py", "--input", pattern, "--output", str(out), "--sd3-root",
               str(enc), "--resolution", "64", "--t5-len", "16", "--batch-size", "4"]
        wall, _, errs = _run([(cmd, _env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r)) for r in range(world)])
        got = json.loads((out / "manifest.json").read_text())["num_samples"]
        assert got == n, (got, n)
        # each rank's last progress line: "| S samples, R samples/s" since its encoders were loaded
        busy = []
        for e in errs:
            last = [ln for ln in e.splitlines() if ln.endswith("samples/s")][-1]
            samples, rate = last.rsplit("| ", 1)[1].replace(" samples/s", "").split(" samples, ")
            busy.append(int(samples) / float(rate))
        rates[world] = n / max(busy)
        print(f"preprocess {n} images from {n_tars} tars on {world} rank(s): {rates[world]:.1f} images/s "
              f"(encoding, the slowest rank's time; {wall:.1f} s in all with start-up and encoder loading)")
    print(f"preprocessing 2 ranks / 1 rank: {rates[2] / rates[1]:.2f}x")
    return rates


def bench_startup(tmp: Path, small: int, large: int) -> dict:
    from megatron_sd3.data.mock import MockDataset
    from megatron_sd3.data.shards import write_dataset

    res = {}
    for n in (small, large):
        path = tmp / f"data{n}"
        write_dataset(MockDataset(n, latent_size=(8, 8), in_channels=16, text_len=16, text_dim=32, pooled_dim=32),
                      path, shard_size=1000)
        cmd = [sys.executable, "pretrain_sd3.py", "--config", "configs/sd3_light_tiny.toml", "--data-path", str(path),
               "--train-iters", "1", "--lr-warmup-iters", "0", "--no-progress", "--log-interval", "1"]
        runs = [_run([(cmd, _env())])[:2] for _ in range(2)]  # the second with warm file caches
        wall, rss = min(r[0] for r in runs), max(r[1][0] for r in runs)
        res[n] = (wall, rss)
        print(f"training start-up on {n} samples: {wall:.1f} s to the end of iteration 1, peak RSS {rss:.0f} MiB")
    (ws, rs), (wl, rl) = res[small], res[large]
    print(f"start-up {large} / {small} samples: time {wl / ws:.2f}x, resident memory {rl / rs:.2f}x")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tars", type=int, default=8)
    p.add_argument("--per-tar", type=int, default=24)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=10000)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_corpus_") as tmp:
        bench_preprocess(Path(tmp), a.tars, a.per_tar)
        bench_startup(Path(tmp), a.small, a.large)


if __name__ == "__main__":
    main()
