"""Exponential moving average of the weights, sharded like the model.

Each rank keeps fp32 copies of its own parameter shards; ``update`` every ``interval`` iterations
does ``ema = decay * ema + (1 - decay) * param``. In checkpoints the EMA is one more sharded state
dict with the model's sharding (``ema.`` + the model's keys), so it reshards with the model.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, interval: int = 1):
        self.model, self.decay, self.interval = model, float(decay), int(interval)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        for n, p in self.model.named_parameters():
            self.shadow[n].copy_(p.detach().float())

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        if iteration % self.interval:
            return
        for n, p in self.model.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def sharded_state_dict(self, model_sd: dict) -> dict:
        """The model's sharded tensors with the EMA data, under keys ``ema.<model key>``."""
        out = {}
        for name, sh in model_sd.items():
            if name in self.shadow and isinstance(sh, ShardedTensor):
                out[name] = dataclasses.replace(sh, key=f"ema.{sh.key}", data=self.shadow[name],
                                                dtype=torch.float32)
        return out

    def load_sharded(self, loaded: dict) -> None:
        for name, t in loaded.items():
            self.shadow[name].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
