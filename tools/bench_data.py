#!/usr/bin/env python
"""Data loader throughput: samples/s of ``build_data_iterator`` over a cached (sharded) dataset,
against what one GPU consumes.

    python tools/bench_data.py                       # generates a dataset of SD3-sized samples in a temp dir
    python tools/bench_data.py --data-path DATA_DIR  # reads an existing dataset (e.g. from preprocess_data.py)
    python tools/bench_data.py --step-ms 294 --gpu-samples-per-step 4   # the GPU to compare with

The default sample is sd3_light's at 1024 px: 16x128x128 latents + 333x4096 text + 2048 pooled in
bf16 (~3.1 MB), so this mostly measures memory-mapped reads + stacking. Timed: the microbatch
iterator itself on cold and on warm pages, and what training reads (warm pages): whole
iterations from ``data/prefetch.IterationPrefetcher`` (pinned when CUDA is available). The last
line compares the cold and the prefetched rate with one GPU's consumption, ``--gpu-samples-per-step`` samples
every ``--step-ms`` (default: sd3_light at 1024 px, micro batch 4, 294 ms per iteration on an
H200, bf16 compiled): a ratio below 1 means the data path starves that GPU.
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
    p.add_argument("--num-samples", type=int, default=96)
    p.add_argument("--latent-size", type=int, default=128, help="latent side (128 = 1024 px, 32 = 256 px)")
    p.add_argument("--text-len", type=int, default=333)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--dp-size", type=int, default=1, help="simulated data-parallel size (rank 0 is measured)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5, help="global batches per timed pass")
    p.add_argument("--step-ms", type=float, default=294.0, help="the GPU's time per iteration")
    p.add_argument("--gpu-samples-per-step", type=int, default=4,
                   help="samples one GPU trains per iteration (micro batch x microbatches)")
    a = p.parse_args(argv)

    import torch

    from megatron_sd3.data import MockDataset, ShardedDataset, build_data_iterator
    from megatron_sd3.data.prefetch import IterationPrefetcher
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
    def timed(path):
        it = build_data_iterator(ds, a.global_batch_size, a.micro_batch_size, 0, a.dp_size, seed=0,
                                 prefetch=a.prefetch)
        src = IterationPrefetcher(it, n_micro) if path == "prefetched" else it
        next(src)  # start-up (threads, first open) not timed
        n, t0 = 0, time.perf_counter()
        if path == "prefetched":
            for _ in range(a.iterations - 1):
                n += sum(mb["sample_index"].numel() for mb in next(src))
        else:
            for _ in range(a.iterations * n_micro - 1):
                n += next(src)["sample_index"].numel()
        dt = time.perf_counter() - t0
        src.close()
        return n / dt

    rates = {}
    for path, name in (("loader", "first pass"), ("loader", "warm pass"),
                       ("prefetched", "warm pass")):
        rates[(path, name)] = r = timed(path)
        label = "loader" if path == "loader" else "prefetched iterations" + (
            " (pinned)" if torch.cuda.is_available() else "")
        print(f"{label} {name}: {r:.1f} samples/s per DP rank ({r * mb_per_sample:.0f} MB/s, "
              f"{mb_per_sample:.2f} MB/sample, mbs {a.micro_batch_size}, prefetch {a.prefetch})")
    need = a.gpu_samples_per_step / (a.step_ms / 1e3)
    cold = rates[("loader", "first pass")]
    warm = rates[("prefetched", "warm pass")]
    print(f"one GPU consumes {need:.1f} samples/s ({a.gpu_samples_per_step} samples per {a.step_ms:g} ms); "
          f"data path: {cold:.1f} samples/s cold ({cold / need:.2f}x), {warm:.1f} warm and prefetched "
          f"({warm / need:.2f}x): {'keeps up' if min(cold, warm) >= need else 'STARVES the GPU'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
