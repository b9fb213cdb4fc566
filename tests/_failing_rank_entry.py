"""pretrain_sd3.py with one rank meeting an error mid-run: FAIL_RANK raises ShardError (what a
damaged shard raises) in its FAIL_AT-th training step; every other rank then meets only the echo
of it (a collective whose peer has gone). For the "said once" test in test_checkpoint_no_orphans."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import torch.distributed as dist

    from megatron_sd3.data.shards import ShardError
    from megatron_sd3.training import pretrain, step

    fail_rank, fail_at = int(os.environ["FAIL_RANK"]), int(os.environ.get("FAIL_AT", "3"))
    real, calls = step.TrainStep.__call__, [0]

    def failing(self, microbatches, consumed_samples):
        calls[0] += 1
        if dist.get_rank() == fail_rank and calls[0] == fail_at:
            raise ShardError("shard /data/shard-00007.pt: truncated (read 1024 of 4096 bytes); redo it")
        return real(self, microbatches, consumed_samples)

    step.TrainStep.__call__ = failing
    return pretrain.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
