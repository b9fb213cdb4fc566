"""Exponential moving average of the weights, from the optimizer's fp32 master weights.

``update`` every ``interval`` iterations does, as diffusers' ``EMAModel(foreach=True)``,
``ema -= (1 - decay_k) * (ema - master)`` with torch ``_foreach`` kernels, where ``master`` is
what the optimizer updates, not the model's bf16 copy:

* megatron's ``Float16OptimizerWithFloat16Params`` (bf16 params): each param's fp32
  ``main_param``; the EMA is a full fp32 copy of this rank's parameter shards;
* the distributed optimizer: each data-parallel rank holds the master weights of only its range of
  every parameter (``main_param`` with ``main_param_sharded``, fp32 params are their own master);
  the EMA then holds exactly that range (1 / DP of the model per rank, like the master weights),
  and the full averages are assembled over the optimizer's data-parallel group when they are needed
  (a checkpoint save, ``copy_to``): every element belongs to exactly one rank, so a sum of the
  ranks' zero-filled ranges is exact;
* fp32 params without a mixed-precision optimizer, no optimizer (inference), and params the
  optimizer does not hold (frozen: ``requires_grad=False``): the params (those whole on every rank).

The decay of update ``k = iteration // interval`` (``step = k - 1``) follows diffusers' EMAModel:
``warmup="none"``: the constant ``decay``; ``"ratio"``: ``min(decay, (1 + step) / (10 + step))``
(EMAModel's default); ``"power"``: ``min(decay, 1 - (1 + step / inv_gamma) ** -power)``
(``use_ema_warmup=True``); with warmup the first update (step 0) copies the weights.

In checkpoints the EMA is one more sharded state dict with the model's sharding (``ema.`` + the
model's keys, full fp32 tensors of this rank's TP/PP shards), so it reshards with the model and
does not depend on the data-parallel size or the optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor

WARMUPS = ("none", "ratio", "power")


def _dp_ranges(optimizer) -> tuple[dict, Optional[object]]:
    """{model param: (start, end) of its flattened range this rank's master weights hold} for
    every param of a distributed optimizer inside ``optimizer`` (None when a param's range
    belongs to other ranks), and that optimizer's data-parallel group; ({}, None) without one."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    ranges, group = {}, None
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer is not None else []):
        if not isinstance(opt, DistributedOptimizer):
            continue
        group = opt.data_parallel_group
        for buffer in opt.buffers:  # every param the optimizer shards (the same on every rank)
            for p in buffer.param_index_map:
                ranges[p] = None
        for p, (gbuf_index, dtype, bucket_index) in opt.model_param_gbuf_map.items():  # those held here
            r = opt.gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"].get(p)
            ranges[p] = None if r is None else (r["param"].start, r["param"].end)
    return ranges, group


class EMA:
    def __init__(self, chunks, decay: float, interval: int = 1, *, optimizer=None, warmup: str = "none",
                 inv_gamma: float = 1.0, power: float = 2 / 3):
        if warmup not in WARMUPS:
            raise ValueError(f"EMA warmup {warmup!r}: choose one of {', '.join(WARMUPS)}")
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.decay, self.interval = float(decay), int(interval)
        self.warmup, self.inv_gamma, self.power = warmup, float(inv_gamma), float(power)
        ranges, self.group = _dp_ranges(optimizer)
        self.sharded = self.group is not None
        # per chunk: name -> (start, end) of the flattened range held here (sharded mode, params
        # of the distributed optimizer only)
        self.ranges: list[dict[str, tuple[int, int]]] = []
        self.shadow: list[dict[str, torch.Tensor]] = []
        for c in self.chunks:
            rng, shadow = {}, {}
            for n, p in c.named_parameters():
                if self.sharded and p in ranges:
                    s, e = ranges[p] or (0, 0)
                    rng[n] = (s, e)
                    shadow[n] = torch.empty(e - s, dtype=torch.float32, device=p.device)
                else:  # unsharded, or a frozen param the optimizer does not hold: whole, on every rank
                    shadow[n] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            self.ranges.append(rng)
            self.shadow.append(shadow)
        self._copy_from(self._masters)

    # -- where the averaged values come from ---------------------------------------------------
    def _masters(self, chunk: int):
        """(shadow, fp32 source) pairs of chunk ``chunk``: the optimizer's master weights."""
        c, shadow = self.chunks[chunk], self.shadow[chunk]
        out = []
        for n, p in c.named_parameters():
            main = getattr(p, "main_param", None)
            if n in self.ranges[chunk]:
                s, e = self.ranges[chunk][n]
                if e == s:
                    continue
                src = main if main is not None and getattr(p, "main_param_sharded", False) \
                    else p.detach().view(-1)[s:e]
            else:
                src = main if main is not None and not getattr(p, "main_param_sharded", False) else p.detach()
            out.append((shadow[n], src))
        return out

    def _params(self, chunk: int):
        """(shadow, source) pairs of chunk ``chunk``: the model params (the range held here)."""
        c, shadow = self.chunks[chunk], self.shadow[chunk]
        out = []
        for n, p in c.named_parameters():
            if n in self.ranges[chunk]:
                s, e = self.ranges[chunk][n]
                if e > s:
                    out.append((shadow[n], p.detach().view(-1)[s:e]))
            else:
                out.append((shadow[n], p.detach()))
        return out

    @torch.no_grad()
    def _copy_from(self, pairs_of) -> None:
        for i in range(len(self.chunks)):
            pairs = pairs_of(i)
            if pairs:
                torch._foreach_copy_([s for s, _ in pairs], [src.float() for _, src in pairs])

    # -- the average ---------------------------------------------------------------------------
    def decay_at(self, iteration: int) -> float:
        """The decay of the update at ``iteration`` (diffusers' ``EMAModel.get_decay``)."""
        if self.warmup == "none":
            return self.decay
        step = iteration // self.interval - 1
        if step <= 0:
            return 0.0
        if self.warmup == "power":
            d = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            d = (1 + step) / (10 + step)
        return min(d, self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights (e.g. just loaded ones)."""
        self._copy_from(self._params)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        if iteration % self.interval:
            return
        one_minus = 1.0 - self.decay_at(iteration)
        for i in range(len(self.chunks)):
            pairs = self._masters(i)
            if not pairs:
                continue
            shadow = [s for s, _ in pairs]
            src = [m if m.dtype == torch.float32 else m.float() for _, m in pairs]
            torch._foreach_sub_(shadow, torch._foreach_sub(shadow, src), alpha=one_minus)

    # -- full tensors ----------------------------------------------------------------------------
    @torch.no_grad()
    def full(self, chunk: int = 0) -> dict[str, torch.Tensor]:
        """Chunk ``chunk``'s averages as full fp32 tensors of the model's (TP/PP) shapes. In sharded
        mode a collective over the optimizer's data-parallel group: every rank must call it."""
        c, shadow = self.chunks[chunk], self.shadow[chunk]
        if not self.sharded:
            return shadow
        ranges = self.ranges[chunk]
        params = [(n, p) for n, p in c.named_parameters() if n in ranges]
        total = sum(p.numel() for _, p in params)
        flat = torch.zeros(total, dtype=torch.float32, device=params[0][1].device if params else "cpu")
        out, off = {}, 0
        for n, p in params:
            s, e = ranges[n]
            flat[off + s: off + e] = shadow[n]
            out[n] = flat[off: off + p.numel()].view(p.shape)
            off += p.numel()
        dist.all_reduce(flat, group=self.group)
        return {n: out.get(n, shadow[n]) for n in shadow}  # frozen params are whole on every rank

    def sharded_state_dict(self, model_sd: dict, chunk: int = 0) -> dict:
        """Chunk ``chunk``'s sharded tensors with the EMA data, under keys ``ema.<model key>``
        (a collective in sharded mode: every rank calls it, as ``dist_checkpointing`` does)."""
        full = self.full(chunk)
        return {name: dataclasses.replace(sh, key=f"ema.{sh.key}", data=full[name], dtype=torch.float32)
                for name, sh in model_sd.items() if name in full and isinstance(sh, ShardedTensor)}

    @torch.no_grad()
    def load_sharded(self, loaded: dict, chunk: int = 0) -> None:
        """Take the full tensors of ``sharded_state_dict``'s layout (the range held here in
        sharded mode)."""
        for name, t in loaded.items():
            if name in self.ranges[chunk]:
                s, e = self.ranges[chunk][name]
                self.shadow[chunk][name].copy_(t.reshape(-1)[s:e])
            else:
                self.shadow[chunk][name].copy_(t)

    @torch.no_grad()
    def copy_to(self, chunks) -> None:
        """Write the averaged weights into ``chunks`` (same structure as the tracked ones; a
        collective in sharded mode)."""
        chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        for i, c in enumerate(chunks):
            full = self.full(i)
            for n, p in c.named_parameters():
                p.copy_(full[n].to(p.dtype))
