"""Dataset blends: Megatron-LM's ``--data-path 0.7 A 0.3 B``.

``parse_blend(["0.7", "A", "0.3", "B"])`` -> ``[(0.7, "A"), (0.3, "B")]`` (weights normalised to sum
1); ``["A"]`` -> ``[(1.0, "A")]``, one dataset as before.

``BlendedDataset(datasets, weights, seed)`` is one dataset (the sampler's contract: ``__len__``,
``get``, ``get_batch``, ``bucket_ids``, ``buckets``) whose samples are drawn from the parts in the
given shares:

* its length is one *blend epoch*: the smallest ``N`` in which every part gets at least all of its
  samples at its weight (``N = max_d len(d) / w_d``, then ``n_d = ceil(w_d N)`` draws of part ``d``),
  so the part that needs the most is seen exactly once per epoch and none is cut short;
* part ``d``'s ``n_d`` draws are its samples in order, cycled; the last, partial cycle takes a
  subset chosen by a generator keyed by ``(seed, "blend", d)``; the global shuffle of the sampler
  (``data/sampler.py``) then mixes the parts, bucket by bucket, each epoch anew;
* ``dataset_index[i]`` / ``dataset_sample_index[i]`` (Megatron's names) say where blended sample
  ``i`` comes from; ``buckets`` is the union of the parts' latent sizes.

Everything is a function of the parts' sizes and bucket ids, the weights and the seed: the same
on every rank and after a resume (which refuses a changed blend: ``blend_signature``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from megatron_sd3.data._seeding import derive_seed


class BlendError(ValueError):
    """A blend that cannot be read (one line naming the flag and the fix)."""


def parse_blend(values: Sequence[str] | str | None, flag: str = "--data-path") -> list[tuple[float, str]]:
    """``[(weight, path), ...]`` of Megatron-LM's blend form, weights normalised; one path alone
    has weight 1."""
    if values is None:
        return []
    vals = values.split() if isinstance(values, str) else [str(v) for v in values]
    if not vals:
        raise BlendError(f"{flag} needs a dataset directory, or weight-path pairs (0.7 A 0.3 B)")
    if len(vals) == 1:
        return [(1.0, vals[0])]
    if len(vals) % 2:
        raise BlendError(f"{flag} {' '.join(vals)}: give one directory, or weight-path pairs "
                         f"(e.g. {flag} 0.7 A 0.3 B)")
    pairs = []
    for w, p in zip(vals[::2], vals[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise BlendError(f"{flag}: {w!r} is not a weight; give weight-path pairs (e.g. {flag} 0.7 A 0.3 B)") \
                from None
        if not (math.isfinite(weight) and weight > 0):
            raise BlendError(f"{flag}: the weight of {p} must be > 0, got {w}")
        pairs.append((weight, p))
    paths = [p for _, p in pairs]
    if len(set(paths)) != len(paths):
        raise BlendError(f"{flag}: a dataset appears twice in the blend; give each once with its summed weight")
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def blend_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Draws of each part in one blend epoch (see the module docstring)."""
    if any(n <= 0 for n in sizes):
        raise BlendError(f"every dataset of a blend needs samples; sizes {list(sizes)}")
    n0 = max(n / w for n, w in zip(sizes, weights))
    return [max(n, math.ceil(w * n0 - 1e-9)) for n, w in zip(sizes, weights)]


def blend_signature(blend: Sequence[tuple[float, str]], sizes: Sequence[int]) -> list[dict]:
    """What the data order depends on, for the checkpoint: each part's weight and size (its path
    is recorded, not compared: data may move)."""
    return [{"weight": round(float(w), 12), "path": str(p), "num_samples": int(n)}
            for (w, p), n in zip(blend, sizes)]


def signature_problem(saved: Sequence[dict] | None, run: Sequence[dict] | None) -> str | None:
    """Why a resume under ``run`` would not continue ``saved``'s data order (None: it would)."""
    if not saved or not run or (len(saved) == 1 and len(run) == 1):
        return None
    key = lambda sig: [(d["weight"], d["num_samples"]) for d in sig]  # noqa: E731
    if key(saved) == key(run):
        return None
    form = lambda sig: " ".join(f"{d['weight']:g} {d['path']}" for d in sig)  # noqa: E731
    return (f"the checkpoint was trained on the blend --data-path {form(saved)} "
            f"({', '.join(str(d['num_samples']) for d in saved)} samples) and this run asks for {form(run)} "
            f"({', '.join(str(d['num_samples']) for d in run)} samples): the data order is keyed by the blend; "
            f"resume with the checkpoint's blend")


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int, names: Sequence[str] | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise BlendError("a blend needs one weight per dataset")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.names = list(names) if names is not None else [f"dataset{d}" for d in range(len(datasets))]
        sizes = [len(d) for d in self.datasets]
        counts = blend_counts(sizes, self.weights)
        index, sample = [], []
        for d, (n, c) in enumerate(zip(sizes, counts)):
            full, rest = divmod(c, n)
            rows = [np.tile(np.arange(n, dtype=np.int64), full)]
            if rest:
                rng = np.random.Generator(np.random.PCG64(derive_seed(int(seed), "blend", d)))
                rows.append(np.sort(rng.permutation(n)[:rest]).astype(np.int64))
            sample.append(np.concatenate(rows))
            index.append(np.full(c, d, dtype=np.int64))
        self.dataset_index = np.concatenate(index)
        self.dataset_sample_index = np.concatenate(sample)
        self.counts = counts
        # the union of the parts' buckets, and each blended sample's bucket in it
        self.buckets: list[tuple[int, int]] = []
        maps = []
        for ds in self.datasets:
            own = [tuple(b) for b in getattr(ds, "buckets", None) or []]
            m = []
            for b in own:
                if b not in self.buckets:
                    self.buckets.append(b)
                m.append(self.buckets.index(b))
            maps.append(np.asarray(m or [0], dtype=np.int64))
        ids = np.empty(len(self.dataset_index), dtype=np.int64)
        for d, ds in enumerate(self.datasets):
            sel = self.dataset_index == d
            own_ids = getattr(ds, "bucket_ids", None)
            own_ids = np.zeros(len(ds), dtype=np.int64) if own_ids is None else np.asarray(own_ids, dtype=np.int64)
            ids[sel] = maps[d][own_ids[self.dataset_sample_index[sel]]]
        self.bucket_ids = ids

    def __len__(self) -> int:
        return len(self.dataset_index)

    def source(self, i: int) -> tuple[int, int]:
        """``(part, sample of that part)`` of blended sample ``i``."""
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def get(self, i: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        d, j = self.source(int(i))
        ds = self.datasets[d]
        if hasattr(ds, "get"):
            return ds.get(j, keys)
        s = ds[j]
        return s if keys is None else {k: v for k, v in s.items() if k in keys}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.get(i)

    def get_batch(self, indices: Sequence[int], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Samples ``indices`` stacked, each part read with its own ``get_batch`` (or per sample);
        ``mask`` is present when any sample has one (all-ones for the others)."""
        from megatron_sd3.data.sampler import collate

        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        parts = {}
        for d in np.unique(self.dataset_index[idx]):
            pos = np.flatnonzero(self.dataset_index[idx] == d)
            rows = self.dataset_sample_index[idx[pos]].tolist()
            ds = self.datasets[int(d)]
            if hasattr(ds, "get_batch"):
                parts[int(d)] = (pos, ds.get_batch(rows, keys))
            else:
                samples = [ds[j] if keys is None else {k: v for k, v in ds[j].items() if k in keys} for j in rows]
                got = collate(samples, rows)
                got.pop("sample_index", None)
                parts[int(d)] = (pos, got)
        names = []
        for _, got in parts.values():
            names += [k for k in got if k not in names]
        out = {}
        for k in names:
            ref = next(got[k] for _, got in parts.values() if k in got)
            buf = (torch.ones if k == "mask" else torch.empty)((len(idx), *ref.shape[1:]), dtype=ref.dtype)
            for pos, got in parts.values():
                if k in got:
                    buf[torch.as_tensor(pos)] = got[k]
            out[k] = buf
        return out

    def drawn(self, indices) -> list[int]:
        """How many of the blended samples ``indices`` come from each part."""
        return np.bincount(self.dataset_index[np.asarray(indices, dtype=np.int64)],
                           minlength=len(self.datasets)).tolist()
