"""Exponential moving average of the weights, sharded like the model.

Each rank keeps fp32 copies of its own parameter shards (of every model chunk, with virtual
pipeline stages); ``update`` every ``interval`` iterations does
``ema = decay * ema + (1 - decay) * param``. In checkpoints the EMA is one more sharded state dict
with the model's sharding (``ema.`` + the model's keys), so it reshards with the model.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor


class EMA:
    def __init__(self, chunks, decay: float, interval: int = 1):
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.decay, self.interval = float(decay), int(interval)
        self.shadow = [{n: p.detach().float().clone() for n, p in c.named_parameters()} for c in self.chunks]

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        for c, shadow in zip(self.chunks, self.shadow):
            for n, p in c.named_parameters():
                shadow[n].copy_(p.detach().float())

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        if iteration % self.interval:
            return
        for c, shadow in zip(self.chunks, self.shadow):
            for n, p in c.named_parameters():
                shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def sharded_state_dict(self, model_sd: dict, chunk: int = 0) -> dict:
        """Chunk ``chunk``'s sharded tensors with the EMA data, under keys ``ema.<model key>``."""
        shadow = self.shadow[chunk]
        return {name: dataclasses.replace(sh, key=f"ema.{sh.key}", data=shadow[name], dtype=torch.float32)
                for name, sh in model_sd.items() if name in shadow and isinstance(sh, ShardedTensor)}

    def load_sharded(self, loaded: dict, chunk: int = 0) -> None:
        for name, t in loaded.items():
            self.shadow[chunk][name].copy_(t)

    @torch.no_grad()
    def copy_to(self, chunks) -> None:
        """Write the averaged weights into ``chunks`` (same structure as the tracked ones)."""
        chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        for c, shadow in zip(chunks, self.shadow):
            for n, p in c.named_parameters():
                p.copy_(shadow[n].to(p.dtype))
