#!/usr/bin/env python
"""Compare training runs in one PNG: training losses, validation loss (mean and per timestep) and
text-image alignment (CLIP score) against iteration.

    python tools/compare_runs.py runs/gamma0 runs/gamma0.5 --output compare.png
    python tools/compare_runs.py a/metrics.jsonl b/metrics.jsonl --labels "gamma 0,gamma 0.5" --smooth 20

Each argument is a run directory holding ``metrics.jsonl`` (or ``--metrics-file NAME``) or a metrics
file itself: JSON lines as ``pretrain_sd3.py --metrics-file`` writes them. Rows without ``"type"``
or with ``"type": "train"`` are training rows (``iteration``, ``loss``, ``denoise_loss``,
``text_recon_loss``); ``"type": "eval"`` rows hold ``loss``, ``denoise_loss``, ``loss_at_t``
(``{t: loss}``), ``clip_score`` and the same for the EMA weights under ``"ema"`` (drawn dashed).
The denoise loss is the figure comparable across gamma (the total loss includes gamma times the
reconstruction loss); the validation denoise loss is also comparable across ``--weighting-scheme``s
(it is the plain velocity MSE; training's is weighted by the scheme). Rows that name their
``weighting_scheme`` put it in the run's legend label: ``gamma 0.5 [cosmap]``. Needs matplotlib
(``pip install matplotlib``).
"""
import argparse
import json
import math
import os
import sys

PANELS = [
    ("train_denoise", "training denoise loss"),
    ("train_loss", "training loss (total)"),
    ("train_recon", "training text-reconstruction loss"),
    ("eval_denoise", "validation denoise loss (dashed: EMA)"),
    ("eval_at_t", "validation loss per timestep t"),
    ("clip", "CLIP score (dashed: EMA)"),
]


class CompareError(ValueError):
    """Bad input; the message names the problem and the fix."""


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metrics_path(arg: str, metrics_file: str = "metrics.jsonl") -> str:
    if os.path.isdir(arg):
        p = os.path.join(arg, metrics_file)
        if not os.path.isfile(p):
            raise CompareError(f"{arg}: no {metrics_file} in this run directory; pass the metrics file itself "
                               f"or --metrics-file NAME")
        return p
    if not os.path.isfile(arg):
        raise CompareError(f"{arg}: neither a run directory nor a metrics file")
    return arg


def read_run(path: str) -> dict:
    """Series of one metrics file: ``{key: ([iterations], [values])}`` plus ``eval_at_t``:
    ``{t: ([iterations], [values])}``."""
    series = {k: ([], []) for k, _ in PANELS if k != "eval_at_t"}
    series.update({"eval_denoise_ema": ([], []), "clip_ema": ([], [])})
    at_t: dict = {}
    schemes: list[str] = []  # in the order the rows name them (a resumed run may change it)
    bad = 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # a run still writing its last line
                continue
            bad += 1
            continue
        it = _num(row.get("iteration")) if isinstance(row, dict) else None
        if it is None:
            continue
        kind = row.get("type", "train")
        scheme = row.get("weighting_scheme")
        if isinstance(scheme, str) and scheme not in schemes:
            schemes.append(scheme)

        def add(key, value):
            v = _num(value)
            if v is not None:
                series[key][0].append(it)
                series[key][1].append(v)

        if kind == "train":
            add("train_denoise", row.get("denoise_loss", row.get("loss")))
            add("train_loss", row.get("loss"))
            add("train_recon", row.get("text_recon_loss"))
        elif kind == "eval":
            add("eval_denoise", row.get("denoise_loss", row.get("loss")))
            add("clip", row.get("clip_score"))
            ema = row.get("ema") if isinstance(row.get("ema"), dict) else {}
            add("eval_denoise_ema", ema.get("denoise_loss", ema.get("loss")))
            add("clip_ema", ema.get("clip_score"))
            for t, v in (row.get("loss_at_t") or {}).items():
                if _num(v) is not None:
                    xs, ys = at_t.setdefault(float(t), ([], []))
                    xs.append(it)
                    ys.append(v)
    if bad:
        print(f"compare_runs: {path}: skipped {bad} line(s) that are not JSON", file=sys.stderr)
    series["eval_at_t"] = dict(sorted(at_t.items()))
    series["weighting_scheme"] = ",".join(schemes)
    return series


def smooth(ys, window: int):
    if window <= 1 or len(ys) < 2:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: list[tuple[str, dict]], output: str, smooth_window: int = 1, title: str | None = None):
    """Draw the panels for ``[(label, read_run(...)), ...]`` into ``output``; returns the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError("compare_runs needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax_of = {key: ax for (key, _), ax in zip(PANELS, axes.flat)}
    for (key, name), ax in zip(PANELS, axes.flat):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, s) in enumerate(runs):
        c = colors[i % len(colors)]
        if s.get("weighting_scheme"):
            label = f"{label} [{s['weighting_scheme']}]"
        for key in ("train_denoise", "train_loss", "train_recon"):
            xs, ys = s[key]
            if xs:
                ax_of[key].plot(xs, smooth(ys, smooth_window), color=c, label=label)
        for key, ema_key in (("eval_denoise", "eval_denoise_ema"), ("clip", "clip_ema")):
            for k, style in ((key, "-"), (ema_key, "--")):
                xs, ys = s[k]
                if xs:
                    ax_of[key].plot(xs, ys, style, color=c, marker="o", markersize=3,
                                    label=label if k == key else f"{label} (EMA)")
        at_t = s["eval_at_t"]
        for j, (t, (xs, ys)) in enumerate(at_t.items()):
            alpha = 0.35 + 0.65 * (j + 1) / len(at_t)
            ax_of["eval_at_t"].plot(xs, ys, color=c, alpha=alpha, marker=".", label=f"{label} t={t:g}")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS")
    p.add_argument("--output", default="compare_runs.png", help="the PNG to write")
    p.add_argument("--metrics-file", default="metrics.jsonl", help="metrics file name inside a run directory")
    p.add_argument("--labels", default=None, help="comma-separated run labels (default: directory names)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the training curves")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    try:
        paths = [metrics_path(r, a.metrics_file) for r in a.runs]
        if a.labels is not None:
            labels = [s.strip() for s in a.labels.split(",")]
            if len(labels) != len(paths):
                raise CompareError(f"--labels has {len(labels)} names for {len(paths)} runs; give one per run")
        else:
            labels = [os.path.basename(os.path.normpath(r)) if os.path.isdir(r)
                      else os.path.basename(os.path.dirname(os.path.abspath(r))) for r in a.runs]
        if a.smooth < 1:
            raise CompareError(f"--smooth must be >= 1, got {a.smooth}")
        runs = [(lab, read_run(path)) for lab, path in zip(labels, paths)]
        if not any(s[k][0] for _, s in runs for k, _ in PANELS if k != "eval_at_t"):
            raise CompareError("no rows with an iteration in any metrics file; are these pretrain_sd3.py "
                               "--metrics-file outputs?")
        plot_runs(runs, a.output, a.smooth, a.title)
    except CompareError as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
