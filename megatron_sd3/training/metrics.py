"""Where the run's figures go: ``--metrics-file`` (JSON lines), TensorBoard and Weights & Biases.

``MetricsWriter(path, tb_dir, wandb=WandbSettings(...) | None, run_config=...)`` writes on rank 0
only (every other rank gets a writer that does nothing):

* ``write(rec)``: one JSON line per record (``"type": "train"`` or ``"type": "eval"``; see
  ``training/pretrain.py`` and ``training/evaluate.py`` for the keys) and the same numbers as
  scalars to TensorBoard and W&B, at step ``rec["iteration"]``. Training rows go under their own
  names (``loss``, ``denoise_loss``, ...); evaluation rows under ``validation/<key>``, the per
  timestep losses under ``validation/denoise_loss_at_t/<t>`` and the EMA's under
  ``validation-ema/...``;
* ``image(tag, hwc_uint8, iteration)``: a sample grid to TensorBoard and W&B.

TensorBoard and wandb are optional and imported only when asked for. ``--wandb-project`` without
wandb installed is a one-line error (``MetricsError``) before training starts; ``WANDB_MODE=offline``
runs without a network (wandb's own setting).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class MetricsError(RuntimeError):
    """A logging destination cannot be used (one-line message naming the fix)."""


@dataclass(frozen=True)
class WandbSettings:
    project: str
    exp_name: Optional[str] = None
    save_dir: Optional[str] = None


def check_wandb(settings: Optional[WandbSettings]) -> None:
    """Fail early (before any process group) when W&B is asked for but not installed."""
    if settings is None:
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise MetricsError("--wandb-project needs wandb: pip install wandb (or drop --wandb-project)")


def scalars(rec: dict) -> dict[str, float]:
    """The finite numbers of one record, under the names TensorBoard and W&B get."""
    out: dict[str, float] = {}

    def put(name, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)

    if rec.get("type") == "eval":
        def add_eval(prefix, r):
            for k, v in r.items():
                if k == "loss_at_t" and isinstance(v, dict):
                    for t, lv in v.items():
                        put(f"{prefix}/denoise_loss_at_t/{t}", lv)
                elif k not in ("iteration", "type", "ema"):
                    put(f"{prefix}/{k}", v)

        add_eval("validation", rec)
        if isinstance(rec.get("ema"), dict):
            add_eval("validation-ema", rec["ema"])
    else:
        for k, v in rec.items():
            if isinstance(v, dict):  # e.g. dataset_samples {dataset: samples}
                for name, sv in v.items():
                    put(f"{k}/{name}", sv)
            elif k not in ("iteration", "type"):
                put(k, v)
    return out


class MetricsWriter:
    def __init__(self, path: Optional[str], tb_dir: Optional[str], wandb: Optional[WandbSettings] = None,
                 run_config: Optional[dict] = None, rank: Optional[int] = None):
        self.fh = None
        self.tb = None
        self.wandb = None
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
        if rank != 0:
            return
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a")
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(" > --tensorboard-dir given but tensorboard is not installed (pip install tensorboard); "
                      "skipping it", flush=True)
            else:
                self.tb = SummaryWriter(tb_dir)
        if wandb is not None:
            check_wandb(wandb)
            import wandb as wandb_module

            save_dir = wandb.save_dir
            if save_dir:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb_module.init(project=wandb.project, name=wandb.exp_name, dir=save_dir,
                                           config=run_config or {})

    def write(self, rec: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.tb is None and self.wandb is None:
            return
        values = scalars(rec)
        step = int(rec["iteration"])
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def image(self, tag: str, hwc_uint8, iteration: int, caption: Optional[str] = None) -> None:
        """An ``[H, W, 3]`` uint8 array (numpy or torch) to TensorBoard and W&B."""
        import numpy as np

        arr = np.asarray(hwc_uint8.cpu() if hasattr(hwc_uint8, "cpu") else hwc_uint8)
        if self.tb:
            self.tb.add_image(tag, arr, int(iteration), dataformats="HWC")
        if self.wandb is not None:
            import wandb as wandb_module

            self.wandb.log({tag: wandb_module.Image(arr, caption=caption)}, step=int(iteration))

    def close(self):
        if self.fh:
            self.fh.close()
            self.fh = None
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


__all__ = ["MetricsWriter", "MetricsError", "WandbSettings", "check_wandb", "scalars"]
