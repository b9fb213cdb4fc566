"""A rank (initialize_distributed, one process) that then forks children blocked forever, the way
code we do not own does: a multiprocessing "fork" child in a queue read (megatron-core's checkpoint
writer workers), a bare os.fork child, and a child forked by a helper thread that then ends.
Prints ``CHILDREN pid ...`` and sleeps until killed."""
import multiprocessing
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_forever(q):
    q.get()  # nothing is ever put


def _fork_sleeper():
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(60)
    return pid


def main():
    from megatron_sd3.distributed import initialize_distributed

    initialize_distributed(watch_parent=False)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    reader = ctx.Process(target=_read_forever, args=(q,), daemon=False)
    reader.start()
    pids = [reader.pid, _fork_sleeper()]
    box = []
    t = threading.Thread(target=lambda: box.append(_fork_sleeper()))
    t.start()
    t.join()  # the forking thread is gone: its child must live on while this process does
    pids += box
    time.sleep(3)
    alive = [p for p in pids if os.waitpid(p, os.WNOHANG) == (0, 0)]
    print("CHILDREN", *pids, "ALIVE", len(alive), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
