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
A folder written by ``tools/sweep.py`` (it holds ``sweep.json``), or the ``cells.jsonl`` written from
one, gives, per cell (its seeds pooled),
the mean and the 95% Student-t interval over seeds of the final evaluation's loss terms and losses
at each t and of the last sample grid's prompt-following share (with and without guidance), and the
paired difference against gamma 0 on the same seeds: ``sweep.md``, ``sweep.csv``,
``sweep_loss_at_t.png`` and ``sweep_accuracy.png`` in ``--output-dir`` (default ``SWEEP/compare``, or
the folder of the ``cells.jsonl``), with ``cells.csv`` (a row per cell and seed: its final values)
and ``cells.jsonl`` (every metrics row of every finished cell, each naming its ``cell``).

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


# -- a sweep folder (tools/sweep.py): intervals over seeds, paired against gamma 0 --------------------------
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
"""Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; between rows the lower
row's (a slightly wider interval); 1.96 beyond 120."""

SAMPLE_METRICS = ("prompt_following", "prompt_following_no_guidance", "prompt_following_seen",
                  "prompt_following_held_out", "object_position", "object_colour", "object_shape")
SWEEP_METRICS = ("denoise_loss", "text_recon_loss", *SAMPLE_METRICS, "text_recon_grad_ratio")
"""Per cell: the final evaluation's loss terms, the last sample grid's share of samples that
follow their prompt (with the run's guidance, and without; on the compositional task also on seen
and held-out captions, and per object its position, colour and shape), the final evaluation's
ratio of the text-recon to the denoise gradient norm on the text streams
(``--log-text-grad-norms``), plus ``loss_at_t/<t>``."""


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    if df > 120:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_ci(xs) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan with one value)."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n == 1:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t975(n - 1) * sd / math.sqrt(n)


def _split_cell(name: str) -> tuple[dict, str]:
    parts = dict(p.split("=", 1) for p in name.split("__"))
    return {k: v for k, v in parts.items() if k != "seed"}, parts.get("seed", "")


def _rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def final_values(rows) -> dict:
    """The last evaluation's terms and ``loss_at_t/<t>``, and the last sample grid's shares, of a
    run's metrics rows (or its metrics file)."""
    out: dict = {}
    for row in _rows(rows) if isinstance(rows, str) else rows:
        if row.get("type") == "eval":
            for k in ("denoise_loss", "text_recon_loss", "text_recon_grad_ratio"):
                if _num(row.get(k)) is not None:
                    out[k] = row[k]
            for t, v in (row.get("loss_at_t") or {}).items():
                if _num(v) is not None:
                    out[f"loss_at_t/{t}"] = v
        elif row.get("type") == "samples":
            for k in SAMPLE_METRICS:
                if _num(row.get(k)) is not None:
                    out[k] = row[k]
    return out


def sweep_cells(source: str, metrics_file: str = "metrics.jsonl") -> dict:
    """Every finished cell's metrics rows, ``{cell name: [rows]}`` in the sweep's order: from a
    folder written by tools/sweep.py (the cells with ``done``: a cell stopped midway has no final
    rows yet) or from the ``cells.jsonl`` :func:`write_cells` made of one (each row with its
    ``cell``)."""
    if os.path.isfile(source):
        cells: dict = {}
        for row in _rows(source):
            if "cell" not in row:
                raise CompareError(f"{source}: a row without 'cell'; give a cells.jsonl written by compare_runs")
            cells.setdefault(row.pop("cell"), []).append(row)
        return cells
    spec_path = os.path.join(source, "sweep.json")
    if not os.path.isfile(spec_path):
        raise CompareError(f"{source}: no sweep.json; give a folder written by tools/sweep.py or its cells.jsonl")
    cells = {}
    for name in json.load(open(spec_path))["cells"]:
        path = os.path.join(source, name, metrics_file)
        if os.path.isfile(path) and os.path.isfile(os.path.join(source, name, "done")):
            cells[name] = _rows(path)
    return cells


def _metric_order(m: str):
    return m.startswith("loss_at_t/"), SWEEP_METRICS.index(m) if m in SWEEP_METRICS else float(m.split("/")[1])


def write_cells(cells: dict, out_dir: str) -> tuple[str, str]:
    """``cells.csv``: a row per cell and seed (its flags, seed and final values); ``cells.jsonl``:
    every metrics row of every cell, each with its ``cell`` (what :func:`sweep_cells` reads back)."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    params = list(dict.fromkeys(k for n in cells for k in _split_cell(n)[0]))
    table = [{**_split_cell(n)[0], "seed": _split_cell(n)[1], **final_values(rows)} for n, rows in cells.items()]
    metrics = sorted({k for r in table for k in r} - {"seed", *params}, key=_metric_order)
    csv_path, jsonl_path = os.path.join(out_dir, "cells.csv"), os.path.join(out_dir, "cells.jsonl")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*params, "seed", *metrics])
        w.writeheader()
        w.writerows(table)
    with open(jsonl_path, "w") as f:
        for name, rows in cells.items():
            for row in rows:
                f.write(json.dumps({"cell": name, **row}) + "\n")
    return csv_path, jsonl_path


def summarize_sweep(sweep, metrics_file: str = "metrics.jsonl") -> list[dict]:
    """Rows ``{cell, metric, n, mean, ci95, diff, diff_ci95, n_paired}``: per cell (the seeds
    pooled), each metric's mean and 95% interval over seeds, and the paired difference against the
    same cell at gamma 0 on the seeds both have (nan for gamma 0 itself). ``sweep``: a sweep
    folder or its cells.jsonl (:func:`sweep_cells`), or the cells already read."""
    cells = sweep if isinstance(sweep, dict) else sweep_cells(sweep, metrics_file)
    groups: dict = {}
    for name, rows in cells.items():
        params, seed = _split_cell(name)
        groups.setdefault(tuple(params.items()), {})[seed] = final_values(rows)
    if not groups:
        raise CompareError(f"{sweep}: no cell has finished yet; run the sweep first")

    def baseline(key):
        params = dict(key)
        if "text_recon_gamma" not in params:
            return None
        base = {k: v for k, v in params.items() if k != "text_recon_target_layer"}
        base["text_recon_gamma"] = next((dict(k)["text_recon_gamma"] for k in groups
                                         if float(dict(k).get("text_recon_gamma", 1)) == 0), None)
        hit = [k for k in groups if dict(k) == base]
        return hit[0] if hit and hit[0] != key else None

    rows = []
    for key, by_seed in groups.items():
        base = groups.get(baseline(key)) if baseline(key) else None
        metrics = sorted({m for v in by_seed.values() for m in v}, key=_metric_order)
        for m in metrics:
            vals = [v[m] for v in by_seed.values() if m in v]
            mean, ci = mean_ci(vals)
            diff = dci = math.nan
            n_paired = 0
            if base is not None:
                pairs = [(by_seed[s][m], base[s][m]) for s in by_seed if s in base and m in by_seed[s] and m in base[s]]
                n_paired = len(pairs)
                diff, dci = mean_ci([a - b for a, b in pairs])
            rows.append({"cell": ",".join(f"{k}={v}" for k, v in key), "metric": m, "n": len(vals), "mean": mean,
                         "ci95": ci, "diff": diff, "diff_ci95": dci, "n_paired": n_paired})
    return rows


def write_sweep_tables(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """``sweep.csv`` (every row) and ``sweep.md`` (the headline metrics, mean ± 95% and the paired
    difference against gamma 0)."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(out_dir, "sweep.csv"), os.path.join(out_dir, "sweep.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def fmt(m, c):
        return "—" if math.isnan(m) else (f"{m:.4g}" if math.isnan(c) else f"{m:.4g} ± {c:.2g}")

    cells = list(dict.fromkeys(r["cell"] for r in rows))
    head = [m for m in SWEEP_METRICS if any(r["metric"] == m for r in rows)]
    lines = ["| cell | seeds | " + " | ".join(f"{m} (Δ vs gamma 0)" for m in head) + " |",
             "| --- | --- | " + " | ".join("---" for _ in head) + " |"]
    for c in cells:
        by = {r["metric"]: r for r in rows if r["cell"] == c}
        n = max(r["n"] for r in by.values())
        vals = []
        for m in head:
            r = by.get(m)
            if r is None:
                vals.append("—")
                continue
            d = "" if math.isnan(r["diff"]) else f" ({fmt(r['diff'], r['diff_ci95'])})"
            vals.append(fmt(r["mean"], r["ci95"]) + d)
        lines.append(f"| {c} | {n} | " + " | ".join(vals) + " |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_sweep(rows: list[dict], out_dir: str) -> list[str]:
    """``sweep_loss_at_t.png`` (each cell's final validation loss against t, 95% band),
    ``sweep_accuracy.png`` (the prompt-following share against gamma, log axis, error bars) and,
    with ``text_recon_grad_ratio`` in the rows, ``sweep_grad_ratio.png`` (log-log, against gamma)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError("compare_runs needs matplotlib: pip install matplotlib") from None
    paths = []
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cells:
        pts = sorted((float(r["metric"].split("/")[1]), r["mean"], r["ci95"]) for r in rows
                     if r["cell"] == c and r["metric"].startswith("loss_at_t/"))
        if pts:
            ts, ms, cis = zip(*pts)
            line, = ax.plot(ts, ms, marker="o", markersize=3, label=c)
            lo = [m - (0 if math.isnan(ci) else ci) for m, ci in zip(ms, cis)]
            hi = [m + (0 if math.isnan(ci) else ci) for m, ci in zip(ms, cis)]
            ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("t")
    ax.set_ylabel("final validation denoise loss (95% band over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "sweep_loss_at_t.png"))
    fig.savefig(paths[-1], dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric, style in (("prompt_following", "o-"), ("prompt_following_no_guidance", "s--")):
        by_layer: dict = {}
        for r in rows:
            if r["metric"] != metric:
                continue
            params = dict(p.split("=", 1) for p in r["cell"].split(","))
            g = float(params.get("text_recon_gamma", "nan"))
            by_layer.setdefault(params.get("text_recon_target_layer", "-"), []).append((g, r["mean"], r["ci95"]))
        zero = [p for pts in by_layer.values() for p in pts if p[0] == 0]
        for layer, pts in sorted(by_layer.items()):
            pts = sorted(set(pts + zero))
            pts = [p for p in pts if p[0] > 0] if layer == "-" and len(by_layer) > 1 else pts
            if not pts:
                continue
            gs = [max(p[0], 1e-2) for p in pts]  # gamma 0 drawn at 0.01 on the log axis
            ax.errorbar(gs, [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts], fmt=style,
                        capsize=3, label=f"{metric}, target layer {layer}")
    ax.set_xscale("log")
    ax.set_xlabel("text_recon_gamma (gamma 0 at 0.01)")
    ax.set_ylabel("share of samples that follow their prompt")
    ax.grid(alpha=0.3)
    if ax.lines or ax.collections:
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "sweep_accuracy.png"))
    fig.savefig(paths[-1], dpi=100)
    ratio = [r for r in rows if r["metric"] == "text_recon_grad_ratio" and r["mean"] > 0]
    if ratio:  # --log-text-grad-norms: where gamma starts to matter
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by_layer = {}
        for r in ratio:
            params = dict(p.split("=", 1) for p in r["cell"].split(","))
            by_layer.setdefault(params.get("text_recon_target_layer", "-"), []).append(
                (float(params.get("text_recon_gamma", "nan")), r["mean"], r["ci95"]))
        for layer, pts in sorted(by_layer.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[0 if math.isnan(p[2]) else min(p[2], 0.999 * p[1]) for p in pts], fmt="o-", capsize=3,
                        label=f"target layer {layer}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("text_recon_gamma")
        ax.set_ylabel("|gamma grad L_recon| / |grad L_denoise| on the text streams")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "sweep_grad_ratio.png"))
        fig.savefig(paths[-1], dpi=100)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS")
    p.add_argument("--output", default="compare_runs.png", help="the PNG to write")
    p.add_argument("--metrics-file", default="metrics.jsonl", help="metrics file name inside a run directory")
    p.add_argument("--labels", default=None, help="comma-separated run labels (default: directory names)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the training curves")
    p.add_argument("--title", default=None)
    p.add_argument("--output-dir", default=None, help="a sweep folder's tables and figures (default: SWEEP/compare)")
    a = p.parse_args(argv)
    src = a.runs[0]
    if len(a.runs) == 1 and (os.path.isfile(os.path.join(src, "sweep.json")) or src.endswith("cells.jsonl")):
        try:
            cells = sweep_cells(src, a.metrics_file)
            rows = summarize_sweep(cells)
            out_dir = a.output_dir or (os.path.dirname(src) if os.path.isfile(src) else os.path.join(src, "compare"))
            written = [*write_sweep_tables(rows, out_dir), *plot_sweep(rows, out_dir), *write_cells(cells, out_dir)]
        except CompareError as e:
            print(f"compare_runs: error: {e}", file=sys.stderr)
            return 2
        print(open(written[1]).read(), end="")
        print(f"wrote {', '.join(written)}")
        return 0
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
