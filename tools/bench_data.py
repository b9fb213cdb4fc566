#!/usr/bin/env python
"""Data loader throughput: samples/s of ``build_data_iterator`` over a cached (sharded) dataset.

    python tools/bench_data.py                       # generates a dataset of SD3-sized samples in a temp dir
    python tools/bench_data.py --data-path DATA_DIR  # reads an existing dataset (e.g. from preprocess_data.py)

One sample at the origin's shapes is 16x32x32 latents + 333x4096 text + 2048 pooled in bf16 (~2.8 MB), so
this mostly measures memory-mapped reads + stacking. Pages are warm after the first pass; both are printed.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="existing dataset folder; default: generate one")
    p.add_argument("--num-samples", type=int, default=192)
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--text-len", type=int, default=333)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--dp-size", type=int, default=1, help="simulated data-parallel size (rank 0 is measured)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=12, help="global batches per timed pass")
    a = p.parse_args(argv)

    from megatron_sd3.data import MockDataset, ShardedDataset, build_data_iterator
    from megatron_sd3.data.shards import write_dataset

    tmp = None
    path = a.data_path
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        path = tmp.name
        t0 = time.perf_counter()
        write_dataset(MockDataset(a.num_samples, (a.latent_size, a.latent_size), text_len=a.text_len, seed=0),
                      path, shard_size=a.shard_size)
        print(f"generated {a.num_samples} samples in {time.perf_counter() - t0:.1f}s at {path}")
    ds = ShardedDataset(path, verify="fast")
    s0 = ds[0]
    mb_per_sample = sum(v.numel() * v.element_size() for v in s0.values()) / 2**20
    n_micro = a.global_batch_size // (a.micro_batch_size * a.dp_size)
    for name in ("first pass", "warm pass"):
        it = build_data_iterator(ds, a.global_batch_size, a.micro_batch_size, 0, a.dp_size, seed=0,
                                 prefetch=a.prefetch)
        next(it)  # start-up (thread, first open) not timed
        t0 = time.perf_counter()
        n = 0
        for _ in range(a.iterations * n_micro - 1):
            n += next(it)["sample_index"].numel()
        dt = time.perf_counter() - t0
        it.close()
        print(f"loader {name}: {n / dt:.1f} samples/s per DP rank ({n / dt * mb_per_sample:.0f} MB/s, "
              f"{mb_per_sample:.2f} MB/sample, mbs {a.micro_batch_size}, prefetch {a.prefetch})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
