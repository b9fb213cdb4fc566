"""Worker for tests/multiprocess/test_checkpoint_integrity.py: ``pretrain_sd3.py``'s checkpoint
save (or, resuming, its load; with --async-save, its finalisation) on one process with two
intra-op threads leaves no OpenMP thread behind: the threads of the process (/proc/self/task)
are counted right before and after each."""
import json
import os
import sys

import torch


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(out: str, argv: list[str]) -> None:
    from megatron_sd3.training import checkpointing as ckpt
    from megatron_sd3.training import pretrain

    counts = []

    def counted(fn):
        def wrapper(*a, **k):
            (torch.randn(1 << 20) * 2).sum()  # the main thread's own OpenMP team exists from here on
            before = _threads()
            result = fn(*a, **k)
            counts.append([fn.__name__, before, _threads()])
            return result
        return wrapper

    ckpt.save_checkpoint = counted(ckpt.save_checkpoint)
    ckpt.load_checkpoint = counted(ckpt.load_checkpoint)
    ckpt.AsyncSaver._finalize = counted(ckpt.AsyncSaver._finalize)  # --async-save: the save's collectives
    torch.set_num_threads(2)  # what one CPU process on a 2-core machine runs with
    assert pretrain.main(argv) == 0
    with open(out, "w") as fh:
        json.dump(counts, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
