#!/usr/bin/env python
"""A grid of pretrain_sd3.py runs: every combination of some flags' values, times seeds.

    python tools/sweep.py --out runs/sweep --grid 'text_recon_gamma=0,0.1,1,10,100' \\
        'text_recon_target_layer=0,3' --seeds 3 --local -- --config configs/sd3_light_demo.toml
    python tools/sweep.py ... --dry-run            # the commands, one cell a line
    python tools/sweep.py ... --slurm [--dry-run]  # one SLURM job array, a cell per array index

Each cell is one run through ``launch.sh`` with its own folder ``OUT/CELL/``: ``checkpoints/``
(``--save`` and ``--load``: effective_config.json lives there), ``metrics.jsonl`` and ``done`` (written
when the run finished). Arguments after ``--`` go to every run. The same command again skips
finished cells and resumes unfinished ones from their last checkpoint, so a sweep survives kills as
a single run does (add ``--save-interval N`` to the run arguments for checkpoints along the way).
Cells that differ only in a flag with no effect run once: the target layer when gamma is 0
(``NO_EFFECT``). ``--slurm`` submits ``sbatch --array=0-(N-1)`` of this same command with ``--cell
$SLURM_ARRAY_TASK_ID``: each array task runs its cell through launch.sh (``--slurm --dry-run``
prints the batch script). ``OUT/sweep.json`` lists the cells, for ``tools/compare_runs.py``.
"""
import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_EFFECT = {  # flag: (the flag that switches it off, its off value)
    "text_recon_target_layer": ("text_recon_gamma", 0.0),
}


class SweepError(ValueError):
    """Bad input: one line naming the problem and the fix."""


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not vals:
            raise SweepError(f"--grid {item!r}: write NAME=V1,V2,... (a pretrain_sd3.py flag without the dashes)")
        if name in (g for g, _ in grid):
            raise SweepError(f"--grid names {name} twice; give its values once")
        grid.append((name, vals))
    return grid


def _off(cell: dict, name: str) -> bool:
    switch = NO_EFFECT.get(name)
    if switch is None or switch[0] not in cell:
        return False
    try:
        return float(cell[switch[0]]) == switch[1]
    except ValueError:
        return False


def cells(grid, seeds: list[int]) -> list[dict]:
    """Every combination, times seeds, without repeats that differ only in a flag with no effect
    (that flag is dropped from such a cell). Seed by seed: a sweep stopped part way has whole
    seeds of every combination, and more seeds later add cells at the end."""
    out, seen = [], set()
    names = [n for n, _ in grid]
    for seed in seeds:
        for values in itertools.product(*(v for _, v in grid)):
            cell = dict(zip(names, values))
            cell = {k: v for k, v in cell.items() if not _off(cell, k)}
            c = {**cell, "seed": str(seed)}
            key = tuple(sorted(c.items()))
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def cell_name(cell: dict) -> str:
    return "__".join(f"{k}={v}" for k, v in cell.items())


def cell_command(cell: dict, out: Path, run_args: list[str]) -> list[str]:
    d = out / cell_name(cell)
    flags = [a for k, v in cell.items() for a in (f"--{k.replace('_', '-')}", v)]
    return ["bash", str(ROOT / "launch.sh"), *run_args, *flags, "--save", str(d / "checkpoints"),
            "--load", str(d / "checkpoints"), "--metrics-file", str(d / "metrics.jsonl")]


def run_cell(cell: dict, out: Path, run_args: list[str], log=print) -> bool:
    """Run (or resume) one cell unless it is done; True when it finished."""
    d = out / cell_name(cell)
    if (d / "done").exists():
        log(f"sweep: {d.name}: done, skipped")
        return True
    d.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(cell, out, run_args)
    log(f"sweep: {d.name}: " + " ".join(shlex.quote(c) for c in cmd))
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        log(f"sweep: {d.name}: exited {r.returncode}; the same command again resumes it")
        return False
    (d / "done").write_text(json.dumps(cell) + "\n")
    return True


def slurm_script(argv: list[str], n: int, out: Path) -> str:
    """The batch script of the job array: this command with --cell $SLURM_ARRAY_TASK_ID."""
    args = [a for a in argv if a not in ("--slurm", "--dry-run", "--local")]
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__).resolve()), *args])
    return ("#!/usr/bin/env bash\n"
            "#SBATCH --job-name=sd3_sweep\n"
            "#SBATCH --nodes=1\n"
            "#SBATCH --ntasks-per-node=1\n"
            f"#SBATCH --array=0-{n - 1}\n"
            f"#SBATCH --output={out}/slurm-%A_%a.out\n"
            "#SBATCH --signal=B:TERM@120\n"
            f"exec {cmd.replace(' -- ', ' --cell $SLURM_ARRAY_TASK_ID -- ', 1) if ' -- ' in cmd else cmd + ' --cell $SLURM_ARRAY_TASK_ID'}\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, run_args = argv[:i], argv[i + 1:]
    else:
        own, run_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="tools/sweep.py")
    p.add_argument("--out", required=True, help="sweep folder: a subfolder per cell")
    p.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2", help="flags and their values")
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell: --seed BASE .. BASE+N-1")
    p.add_argument("--seed-base", type=int, default=1234)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the cells one after another here (default)")
    mode.add_argument("--slurm", action="store_true", help="submit one SLURM job array, a cell per index")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or the batch script) only")
    p.add_argument("--cell", type=int, default=None, help="run only cell N (what a SLURM array task does)")
    a = p.parse_args(own)
    try:
        if a.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {a.seeds}")
        grid = parse_grid(a.grid)
        if any(n == "seed" for n, _ in grid) or "--seed" in run_args:
            raise SweepError("give seeds with --seeds N (and --seed-base), not as a grid flag or a run argument")
        for flag in ("--save", "--load", "--metrics-file"):
            if flag in run_args:
                raise SweepError(f"{flag} is set per cell (OUT/CELL/...); drop it from the run arguments")
        out = Path(a.out).resolve()
        todo = cells(grid, [a.seed_base + i for i in range(a.seeds)])
        if a.cell is not None and not 0 <= a.cell < len(todo):
            raise SweepError(f"--cell {a.cell}: the sweep has cells 0..{len(todo) - 1}")
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if a.slurm and a.cell is None:
        script = slurm_script(own + (["--", *run_args] if run_args else []), len(todo), out)
        if a.dry_run:
            print(script, end="")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.sbatch").write_text(script)
        return subprocess.run(["sbatch", str(out / "sweep.sbatch")]).returncode
    chosen = [todo[a.cell]] if a.cell is not None else todo
    if a.dry_run:
        for c in chosen:
            print(" ".join(shlex.quote(x) for x in cell_command(c, out, run_args)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"grid": grid, "seeds": a.seeds, "seed_base": a.seed_base,
                                                "run_args": run_args, "cells": [cell_name(c) for c in todo]},
                                               indent=1) + "\n")
    failed = [cell_name(c) for c in chosen if not run_cell(c, out, run_args)]
    if failed:
        print(f"sweep: {len(failed)} of {len(chosen)} cells did not finish (first: {failed[0]}); the same command "
              f"again resumes them", file=sys.stderr)
        return 1
    print(f"sweep: {len(chosen)} cells done in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
