"""Global shuffle, aspect buckets, data-parallel sharding and exact resume.

The trainer's entry point is::

    it = build_data_iterator(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size,
                             seed, consumed_samples=0, keys=None, prefetch=2)
    batch = next(it)   # one microbatch for THIS dp rank

``batch`` is a dict of stacked tensors (``latents`` [mbs, C, H, W], ``prompt_embeds`` [mbs, T, D],
``pooled_prompt_embeds`` [mbs, P], ``mask`` [mbs, H, W] when any sample of the microbatch has one -
samples without a mask get an all-ones mask - and ``sample_index`` [mbs] int64 with the global sample
indices). Tensors keep the dataset's dtype (bf16 for cached shards, fp32 for the mock): the trainer casts.
``keys`` restricts what is read (e.g. the last pipeline stage needs ``("latents", "mask")`` only: noise and
timesteps are keyed by ``sample_index``); ``sample_index`` is always present.

Order (all of it a function of ``(seed, dataset bucket ids, global_batch_size)`` only):

1. Epoch ``e``: within each bucket the sample indices are permuted by a generator keyed by
   ``(seed, e, bucket)`` and cut into full global batches (the remainder of each bucket is dropped for
   that epoch - it is reshuffled into the next one); then the list of all global batches of the epoch is
   permuted by a generator keyed by ``(seed, e)``. Without buckets this is a plain global shuffle.
   So every global batch lies inside one bucket, and every epoch has the same number of global batches
   ``B = sum_b floor(n_b / G)``. A bucket with fewer than ``G`` samples holds no full global batch and is
   never trained on (``small_buckets`` lists them; the trainer says so at start). With
   ``train_small_buckets=True`` each such bucket instead gives one global batch per epoch: its permuted
   samples repeated cyclically up to ``G`` (each sample ``floor(G / n_b)`` or ``ceil(G / n_b)`` times in
   that batch, with its own noise and timestep per occurrence), so ``B = sum_b max(floor(n_b / G), [n_b > 0])``.
2. Global batch ``k`` (counting from the start of training) is batch ``k % B`` of epoch ``k // B``.
3. A global batch of ``G`` samples is split into ``dp_size`` contiguous slices of ``G / dp_size`` (rank ``r``
   gets slice ``r``), each cut into contiguous microbatches of ``micro_batch_size``. Concatenating the
   microbatches of rank 0, then rank 1, ... gives the global batch in order, whatever the layout.
4. Held-out samples: ``holdout = N`` leaves the last ``N`` samples of the dataset (the validation set
   of ``--valid-samples``) out of every epoch: the plan only ever sees samples ``0 .. len - N - 1``.
5. Resume: ``consumed_samples = N`` (a multiple of ``G``) starts at global batch ``N / G``; the stream is then
   exactly the stream of the uninterrupted run after ``N`` samples.

:class:`GlobalBatchPlan` gives the same plan without reading any data, so pipeline stages that do not read
data can still learn the latent shape (bucket) of each iteration: ``plan.latent_shape(k)``.

A dataset is anything with ``__len__`` and ``__getitem__(i) -> dict``; optional attributes ``bucket_ids``
(per-sample bucket index, array-like) and ``buckets`` (latent ``(H, W)`` per bucket), an optional
``get(i, keys)`` to read only some tensors, and an optional ``get_batch(indices, keys)`` returning the
stacked microbatch directly (same result as stacking, with the same mask completion).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from megatron_sd3.data._seeding import derive_seed


_LIVE_ITERATORS: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _stop_prefetch_threads():  # a prefetch thread alive at interpreter exit aborts the process
    for it in list(_LIVE_ITERATORS):
        it.close()


def _bucket_ids_of(dataset) -> np.ndarray:
    ids = getattr(dataset, "bucket_ids", None)
    if ids is None:
        return np.zeros(len(dataset), dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(dataset),):
        raise ValueError(f"dataset.bucket_ids has shape {ids.shape}, expected ({len(dataset)},)")
    return ids


class GlobalBatchPlan:
    """Which samples form global batch ``k`` (see the module docstring); reads no data."""

    def __init__(self, bucket_ids: Sequence[int] | np.ndarray, global_batch_size: int, seed: int,
                 buckets: Sequence[tuple[int, int]] | None = None, *, train_small_buckets: bool = False):
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.buckets = [tuple(b) for b in buckets] if buckets is not None else None
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
        G = self.global_batch_size
        self.train_small_buckets = bool(train_small_buckets)
        self._members = {int(b): np.flatnonzero(self.bucket_ids == b) for b in np.unique(self.bucket_ids)}
        self.batches_per_epoch = int(sum(self._batches_of(len(m)) for m in self._members.values()))
        if self.batches_per_epoch == 0:
            sizes = {b: len(m) for b, m in self._members.items()}
            raise ValueError(
                f"no bucket holds a full global batch of {G} samples (samples per bucket: {sizes}); "
                "use a smaller global batch, more data, or --train-small-buckets")
        self.samples_per_epoch = self.batches_per_epoch * G
        self._epoch = -1
        self._epoch_batches: np.ndarray | None = None

    def _batches_of(self, n: int) -> int:
        full = n // self.global_batch_size
        return max(full, 1) if self.train_small_buckets and n > 0 else full

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """``[batches_per_epoch, G]`` int64 sample indices of epoch ``epoch``."""
        if epoch != self._epoch:
            G = self.global_batch_size
            rows = []
            for b in sorted(self._members):
                m = self._members[b]
                rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, b, "bucket-perm")))
                perm = m[rng.permutation(len(m))]
                if len(m) < G and self.train_small_buckets:  # one batch: the samples repeated cyclically
                    perm = np.resize(perm, G)
                n = (len(perm) // G) * G
                if n:
                    rows.append(perm[:n].reshape(-1, G))
            batches = np.concatenate(rows, axis=0)
            rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, "batch-order")))
            self._epoch_batches = batches[rng.permutation(len(batches))]
            self._epoch = epoch
        return self._epoch_batches

    def batch(self, k: int) -> np.ndarray:
        """Sample indices (int64 ``[G]``) of global batch ``k`` counted from the start of training."""
        e, j = divmod(int(k), self.batches_per_epoch)
        return self.epoch_batches(e)[j]

    def bucket(self, k: int) -> int:
        return int(self.bucket_ids[self.batch(k)[0]])

    def latent_shape(self, k: int) -> tuple[int, int]:
        """Latent ``(H, W)`` of global batch ``k`` (needs ``buckets``)."""
        if self.buckets is None:
            raise ValueError("GlobalBatchPlan was built without buckets")
        return tuple(self.buckets[self.bucket(k)])


def small_buckets(bucket_ids, global_batch_size: int, buckets=None) -> list[tuple[int, tuple | None, int]]:
    """``(bucket, latent (H, W) or None, samples)`` of every non-empty bucket with fewer samples than
    one global batch: the buckets a run without ``train_small_buckets`` never trains on."""
    ids, counts = np.unique(np.asarray(bucket_ids, dtype=np.int64), return_counts=True)
    return [(int(b), tuple(buckets[b]) if buckets is not None else None, int(n))
            for b, n in zip(ids, counts) if 0 < n < global_batch_size]


def small_bucket_report(dataset, global_batch_size: int, train_small_buckets: bool) -> str | None:
    """One line on the buckets smaller than a global batch (None when there are none)."""
    small = small_buckets(_bucket_ids_of(dataset), global_batch_size, getattr(dataset, "buckets", None))
    if not small:
        return None
    total = len(dataset)
    listing = ", ".join(f"bucket {b}{f' ({hw[0]}x{hw[1]})' if hw else ''}: {n}" for b, hw, n in small)
    n_small = sum(n for _, _, n in small)
    if train_small_buckets:
        return (f"{len(small)} aspect bucket(s) hold fewer samples than one global batch of {global_batch_size} "
                f"({listing}; {n_small} of {total} samples): --train-small-buckets trains each as one global "
                f"batch per epoch, its samples repeated to fill it")
    return (f"warning: {len(small)} aspect bucket(s) hold fewer samples than one global batch of "
            f"{global_batch_size} and are never trained on ({listing}; {n_small} of {total} samples); "
            f"pass --train-small-buckets to train them (samples repeated to fill one global batch per epoch) "
            f"or lower --global-batch-size")


def collate(samples: list[dict[str, torch.Tensor]], indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts; a partial ``mask`` is completed with all-ones masks."""
    out: dict[str, torch.Tensor] = {}
    keys = [k for k in samples[0] if k != "mask"]
    for k in keys:
        out[k] = torch.stack([s[k] for s in samples])
    if any("mask" in s for s in samples):
        ref = next(s["mask"] for s in samples if "mask" in s)
        out["mask"] = torch.stack([s["mask"] if "mask" in s else torch.ones_like(ref) for s in samples])
    out["sample_index"] = torch.as_tensor(list(indices), dtype=torch.long)
    return out


def _read(dataset, i: int, keys) -> dict[str, torch.Tensor]:
    get = getattr(dataset, "get", None)
    if get is not None:
        return get(i, keys)
    s = dataset[i]
    return s if keys is None else {k: v for k, v in s.items() if k in keys}


class DataIterator:
    """Infinite iterator over this DP rank's microbatches (see the module docstring)."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0, keys: Sequence[str] | None = None, prefetch: int = 2,
                 holdout: int = 0, train_small_buckets: bool = False):
        G, mbs = int(global_batch_size), int(micro_batch_size)
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad dp_rank/dp_size: {dp_rank}/{dp_size}")
        if mbs <= 0 or G % (mbs * dp_size) != 0:
            raise ValueError(
                f"global batch size {G} is not divisible by micro batch size {mbs} x data-parallel size {dp_size}")
        if consumed_samples % G != 0:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of the global batch size {G}")
        self.dataset = dataset
        ids = _bucket_ids_of(dataset)
        if not 0 <= int(holdout) < len(ids):
            raise ValueError(f"holdout={holdout} must leave training samples of the {len(ids)} in the dataset")
        ids = ids[:len(ids) - int(holdout)]  # the held-out tail is never trained on
        self.plan = GlobalBatchPlan(ids, G, seed, getattr(dataset, "buckets", None),
                                    train_small_buckets=train_small_buckets)
        self.global_batch_size, self.micro_batch_size = G, mbs
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = G // (mbs * dp_size)
        self.keys = None if keys is None else tuple(keys)
        self.consumed_samples = int(consumed_samples)  # global samples of the global batches fully yielded
        self._next_batch = self.consumed_samples // G
        self._micro = 0
        self._prefetch = int(prefetch)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the deterministic stream -------------------------------------------------------------------------
    def _microbatch_indices(self, k: int) -> list[np.ndarray]:
        per_rank = self.global_batch_size // self.dp_size
        local = self.plan.batch(k)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [local[m * self.micro_batch_size:(m + 1) * self.micro_batch_size]
                for m in range(self.num_microbatches)]

    def _load(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            out = get_batch(idx.tolist(), self.keys)
            out["sample_index"] = torch.as_tensor(idx.tolist(), dtype=torch.long)
            return out
        return collate([_read(self.dataset, int(i), self.keys) for i in idx], idx.tolist())

    def _produce(self, start_batch: int):
        k = start_batch
        try:
            while not self._stop.is_set():
                for idx in self._microbatch_indices(k):
                    item = self._load(idx)
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                k += 1
        except BaseException as e:  # handed to the consumer
            self._queue.put(e)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._prefetch > 0:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self._prefetch)
                self._thread = threading.Thread(target=self._produce, args=(self._next_batch,), daemon=True)
                _LIVE_ITERATORS.add(self)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        else:
            item = self._load(self._microbatch_indices(self._next_batch)[self._micro])
        self._micro += 1
        if self._micro == self.num_microbatches:
            self._micro = 0
            self._next_batch += 1
            self.consumed_samples += self.global_batch_size
        return item

    def next_latent_shape(self) -> tuple[int, int] | None:
        """Latent (H, W) of the global batch the next microbatch belongs to (None if the dataset has no buckets)."""
        return self.plan.latent_shape(self._next_batch) if self.plan.buckets is not None else None

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_data_iterator(dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                        seed: int, consumed_samples: int = 0, keys: Sequence[str] | None = None,
                        prefetch: int = 2, holdout: int = 0, train_small_buckets: bool = False) -> DataIterator:
    """This DP rank's infinite microbatch iterator, resuming at ``consumed_samples``, never touching
    the last ``holdout`` samples (see module docstring)."""
    return DataIterator(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size, seed,
                        consumed_samples, keys, prefetch, holdout, train_small_buckets=train_small_buckets)
