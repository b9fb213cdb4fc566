"""A stand-in for pretrain_sd3.py, used by tests/launch/test_launch.py to test launch.sh quickly.

It runs as a torchrun worker and mimics the parts of the real entry's contract that launch.sh
and SLURM care about:
  - process group from torchrun's environment (gloo), one all-reduce per iteration;
  - `--save DIR`: a checkpoint every `--save-interval` iterations, Megatron's layout
    (`iter_0000007/`, `latest_checkpointed_iteration.txt` written last, atomically);
  - `--load DIR`: resume from the latest checkpoint's iteration;
  - `--exit-signal-handler`: on SIGTERM all ranks agree (all-reduce of the flag), save, exit 0;
  - `--train-iters N`: stop after iteration N (and save);
  - `--check-config`: no process group, exit 0 (launch.sh runs this once before the ranks).
Every rank appends one JSON line per event to DIR/events.jsonl so tests can see what happened.
Unknown flags (the real entry's `--config` etc.) are accepted and recorded.
"""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--save-interval", type=int, default=1)
    p.add_argument("--exit-signal-handler", action="store_true")
    p.add_argument("--config")
    p.add_argument("--check-config", action="store_true")
    p.add_argument("--iter-time", type=float, default=0.05, help="seconds of 'work' per iteration")
    args, unknown = p.parse_known_args()
    return args, unknown


def event(save, **kw):
    if not save:
        return
    os.makedirs(save, exist_ok=True)
    kw.update(rank=dist.get_rank() if dist.is_initialized() else None, time=time.time(), pid=os.getpid())
    with open(os.path.join(save, "events.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def load_iteration(load):
    if not load or not os.path.exists(os.path.join(load, LATEST)):
        return 0
    with open(os.path.join(load, LATEST)) as f:
        it = int(f.read().strip())
    state = os.path.join(load, f"iter_{it:07d}", "state.json")
    if not os.path.exists(state):
        raise SystemExit(f"checkpoint {load}: {LATEST} names iteration {it} but {state} is missing")
    return it


def save_checkpoint(save, it, value):
    dist.barrier()
    if dist.get_rank() == 0:
        d = os.path.join(save, f"iter_{it:07d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"iteration": it, "world_size": dist.get_world_size(), "value": value}, f)
        tmp = os.path.join(save, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(it))
        os.replace(tmp, os.path.join(save, LATEST))
    dist.barrier()


def main():
    args, unknown = parse()
    if args.check_config:
        event(args.save, event="check", world_size=int(os.environ.get("WORLD_SIZE", "0")),
              slurm_job=os.environ.get("SLURM_JOB_ID"))
        return 0
    dist.init_process_group("gloo")
    got_signal = []
    if args.exit_signal_handler:
        signal.signal(signal.SIGTERM, lambda s, f: got_signal.append(s))
    if args.save:
        os.makedirs(args.save, exist_ok=True)
    start = load_iteration(args.load)
    event(args.save, event="start", iteration=start, world_size=dist.get_world_size(),
          argv=sys.argv[1:], unknown=unknown, slurm_job=os.environ.get("SLURM_JOB_ID"),
          master=f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
    value = float(start)
    it = start
    while it < args.train_iters:
        time.sleep(args.iter_time)
        t = torch.ones(1) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        value += float(t)
        it += 1
        flag = torch.tensor([1.0 if got_signal else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            if args.save:
                save_checkpoint(args.save, it, value)
            event(args.save, event="exit_signal", iteration=it)
            dist.destroy_process_group()
            return 0
        if args.save and it % args.save_interval == 0:
            save_checkpoint(args.save, it, value)
    if args.save and it % args.save_interval != 0:
        save_checkpoint(args.save, it, value)
    event(args.save, event="done", iteration=it)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
