"""Whole iterations read ahead in the background, in pinned memory on CUDA.

``IterationPrefetcher(iterator, num_microbatches)`` wraps the microbatch iterator of
``data/sampler.build_data_iterator``: a thread takes the next iteration's ``num_microbatches``
microbatches from it and, when CUDA is available, copies every tensor into page-locked memory,
so that ``TrainStep``'s ``non_blocking`` copies to the GPU neither wait nor stage through
pageable memory, and the step never waits on reading, collating or pinning while the previous
iteration runs (``docs/design.md``, section "A step that never waits on the host").
``depth`` iterations are held ready (2 by default). ``next()`` returns a list of microbatch
dicts, ``close()`` stops the thread and closes the wrapped iterator; an error in the thread is
raised by the ``next()`` that would have returned its iteration.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import torch

_END = object()


def pin(batch: dict, enabled: bool = True) -> dict:
    """``batch`` with every tensor in page-locked memory (unchanged when ``enabled`` is False)."""
    if not enabled:
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class IterationPrefetcher:
    def __init__(self, iterator: Iterator[dict], num_microbatches: int, depth: int = 2,
                 pin_memory: Optional[bool] = None):
        if num_microbatches < 1 or depth < 1:
            raise ValueError(f"num_microbatches ({num_microbatches}) and depth ({depth}) must be >= 1")
        self.iterator, self.num_microbatches = iterator, num_microbatches
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="iteration-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            while not self._stop.is_set():
                batch = []
                for _ in range(self.num_microbatches):
                    batch.append(pin(next(self.iterator), self.pin_memory))
                if not self._put(batch):
                    return
        except StopIteration:
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        if self._thread is None:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def ready(self) -> int:
        """Iterations read and waiting (what the step would find without waiting)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the thread (it finishes the microbatch it is reading) and close the iterator."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
