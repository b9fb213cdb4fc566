import threading
import time

import pytest
import torch

from megatron_sd3.data import MockDataset, build_data_iterator
from megatron_sd3.data.prefetch import IterationPrefetcher


def _iterator(prefetch=2):
    ds = MockDataset(64, [(4, 4)], in_channels=4, text_len=5, text_dim=8, pooled_dim=6, with_mask=True, seed=3)
    return build_data_iterator(ds, 8, 2, 0, 1, seed=11, prefetch=prefetch)


def test_same_iterations_as_the_iterator_itself():
    direct = _iterator(prefetch=0)
    want = [[next(direct) for _ in range(4)] for _ in range(3)]
    with IterationPrefetcher(_iterator(), 4) as pf:
        got = [next(pf) for _ in range(3)]
    for wi, gi in zip(want, got):
        assert len(gi) == 4
        for w, g in zip(wi, gi):
            assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)


class _Slow:
    """A microbatch iterator that takes 20 ms a microbatch and records close()."""

    def __init__(self, n=None, fail_at=None):
        self.i, self.n, self.fail_at, self.closed = 0, n, fail_at, False
        self.reader = None

    def __iter__(self):
        return self

    def __next__(self):
        self.reader = threading.current_thread()
        if self.fail_at is not None and self.i == self.fail_at:
            raise OSError("shard 3 unreadable")
        if self.n is not None and self.i >= self.n:
            raise StopIteration
        time.sleep(0.02)
        self.i += 1
        return {"latents": torch.full((1,), float(self.i))}

    def close(self):
        self.closed = True


def test_reads_ahead_in_the_background_and_closes():
    src = _Slow()
    pf = IterationPrefetcher(src, 2, depth=3, pin_memory=False)
    deadline = time.time() + 10
    while pf.ready() < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert pf.ready() == 3 and src.reader is not threading.current_thread()  # read by the thread
    t0 = time.time()
    first = next(pf)
    assert time.time() - t0 < 0.02  # ready: no read on the caller's time
    assert [float(m["latents"]) for m in first] == [1.0, 2.0]
    thread = pf._thread
    pf.close()
    assert not thread.is_alive() and src.closed


def test_error_and_end_reach_the_consumer():
    with IterationPrefetcher(_Slow(fail_at=3), 2, pin_memory=False) as pf:
        next(pf)
        with pytest.raises(OSError, match="shard 3"):
            next(pf)
    with IterationPrefetcher(_Slow(n=5), 2, pin_memory=False) as pf:
        assert len(list(pf)) == 2  # the incomplete third iteration is not handed out


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        IterationPrefetcher(_Slow(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_on_cuda():
    with IterationPrefetcher(_iterator(), 4) as pf:
        assert all(v.is_pinned() for mb in next(pf) for v in mb.values() if isinstance(v, torch.Tensor))
