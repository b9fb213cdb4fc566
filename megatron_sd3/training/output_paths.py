"""Every path a run writes, checked before any process group starts (``pretrain_sd3.py
--check-config``, and so once from ``launch.sh``): a run must not train for hours and then fail at
its first save, metrics line or sample grid.

A path is usable when it is (or can be created as) a directory, or a file, in a directory this
process can write. The check creates nothing of the run's: it writes and removes one probe file in
the deepest directory that already exists, which also finds a read-only filesystem and, for a
user other than root, a missing permission.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from megatron_sd3.config import ConfigError


def _probe(directory: Path) -> Optional[str]:
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    except OSError as e:
        return f"cannot write in {directory} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def path_problem(path: str, is_dir: bool) -> Optional[str]:
    """Why ``path`` (a directory when ``is_dir``, else a file) cannot be written; None when it can."""
    p = Path(path).absolute()
    if p.exists():
        if is_dir and not p.is_dir():
            return f"{p} is a file, not a directory"
        if not is_dir and p.is_dir():
            return f"{p} is a directory, not a file"
        if not is_dir and not os.access(p, os.W_OK):
            return f"{p} is not writable"
        return _probe(p if is_dir else p.parent)
    # The deepest folder that exists; a regular file on the way means nothing can be created.
    ancestor = Path(p.anchor)
    for q in reversed(p.parents):
        if not q.exists():
            break
        if not q.is_dir():
            return f"{q} is a regular file, so {p} cannot be created under it"
        ancestor = q
    return _probe(ancestor)


def output_paths(args) -> list[tuple[str, str, bool]]:
    """``(flag, path, is_dir)`` of every path the run will write."""
    out = []
    if args.save:
        out.append(("--save", args.save, True))
        if getattr(args, "sample_interval", None):
            out.append(("--save (sample grids)", os.path.join(args.save, "samples"), True))
    if getattr(args, "tensorboard_dir", None):
        out.append(("--tensorboard-dir", args.tensorboard_dir, True))
    if getattr(args, "metrics_file", None):
        out.append(("--metrics-file", args.metrics_file, False))
    if getattr(args, "wandb_project", None) and getattr(args, "wandb_save_dir", None):
        out.append(("--wandb-save-dir", args.wandb_save_dir, True))
    return out


def check_output_paths(args) -> None:
    """Raise ConfigError naming the first path the run could not write, and why."""
    for flag, path, is_dir in output_paths(args):
        problem = path_problem(path, is_dir)
        if problem:
            raise ConfigError(f"{flag} {path}: {problem}; give a path in a writable directory")
