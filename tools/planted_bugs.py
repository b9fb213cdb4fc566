"""Plant bugs of relative size 1e-4 in the code under test and see each layout family's test fail.

For every family of the equivalence tests (TP, TP + SP, PP uneven and interleaved, DP with masks,
the distributed optimizer, CP alone and with DP, PP, TP + SP, recomputation full and selective,
FP8 under TP, EMA, reshard on load) one bug is planted in the source (ours, or megatron-core's in the
environment), the family's test is run, and the source is restored:

    python tools/planted_bugs.py [--only NAME ...] [--out docs/results/planted_bugs.jsonl]

One JSON row per bug: the family, what was planted where, the test, whether it failed (``caught``)
and its first assertion line. The run stops (non-zero) if a planted bug is *not* caught. Each bug
is a text replacement that must match exactly once, so a bug that no longer applies is an error,
not a silent pass. Files are restored on any exit, Ctrl-C and SIGTERM included. Run it alone:
it edits the working tree for the duration of each test (about 20 minutes for all, 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEGATRON = "megatron:"  # a path inside the installed megatron-core package


def _rank(kind: str) -> str:
    return f'__import__("megatron.core.parallel_state", fromlist=["_"]).get_{kind}_rank()'


TP_RANK, DP_RANK, CP_RANK = _rank("tensor_model_parallel"), _rank("data_parallel"), _rank("context_parallel")


@dataclass
class Bug:
    name: str
    family: str
    what: str
    path: str
    old: str
    new: str
    test: str


T = "tests/multiprocess/"
BUGS = [
    Bug("tp_attention_out", "TP", "TP rank 1's attention output x (1 + 1e-4) before the output projection",
        "megatron_sd3/models/mmdit_layer.py", "x_out, _ = self.linear_proj(out[:n_img])",
        f"x_out, _ = self.linear_proj(out[:n_img] * (1 + 1e-4 * {TP_RANK}))", T + "test_parallel.py::test_tp2"),
    Bug("sp_slice", "TP + SP", "TP rank 1's sequence-parallel slice x (1 + 1e-4)",
        "megatron_sd3/models/sequence_parallel.py",
        "return scatter_to_sequence_parallel_region(t) if size(config) > 1 else t",
        f"return scatter_to_sequence_parallel_region(t) * (1 + 1e-4 * {TP_RANK}) if size(config) > 1 else t",
        T + "test_parallel.py::test_tp2_sequence_parallel_recon_target_zero_with_masks_and_padded_text"),
    Bug("pp_message_text", "PP", "every pipeline message's text tokens x (1 + 1e-4) when packed",
        "megatron_sd3/models/packing.py", "        parts = [x, c]\n", "        parts = [x, c * (1 + 1e-4)]\n",
        T + "test_parallel.py::test_pp2_sends_exactly_the_plain_bytes"),
    Bug("pp_uneven_message_text", "PP uneven", "the same, on the uneven 3 + 1 split",
        "megatron_sd3/models/packing.py", "        parts = [x, c]\n", "        parts = [x, c * (1 + 1e-4)]\n",
        T + "test_parallel.py::test_pp2_uneven"),
    Bug("vpp_unpacked_text", "PP interleaved (VPP)", "a received message's text tokens x (1 + 1e-4) when unpacked",
        "megatron_sd3/models/packing.py", "        x, c = t[:i], t[i:j]\n", "        x, c = t[:i], t[i:j] * (1 + 1e-4)\n",
        T + "test_parallel.py::test_pp2_interleaved_virtual_stages"),
    Bug("dp_weight_share", "DP with masks", "DP rank 1's share of the global loss weights x (1 + 1e-4)",
        "megatron_sd3/training/step.py",
        "            dist.all_reduce(t, group=ps.get_data_parallel_group())\n",
        "            dist.all_reduce(t, group=ps.get_data_parallel_group())\n"
        f"            t = t * (1 + 1e-4 * {DP_RANK})\n",
        T + "test_parallel.py::test_dp2_with_different_masks_weighted"),
    Bug("distopt_shard_grad", "distributed optimizer", "rank 1's gradient shard x (1 + 1e-4) as the optimizer takes it",
        MEGATRON + "core/optimizer/distrib_optimizer.py",
        "shard_main_param.grad = shard_model_grad.float()\n",
        "shard_main_param.grad = shard_model_grad.float() * (1 + 1e-4 * torch.distributed.get_rank())\n",
        T + "test_parallel.py::test_dp2_distributed_optimizer_overlapped_in_small_buckets_is_plain_dp2_to_the_bit"),
    Bug("cp_text_share", "CP", "the text gradient's CP share 1/CP x (1 + 1e-4)",
        "megatron_sd3/models/context_parallel.py", "_ScaleGrad.apply(t, 1.0 / cp)",
        "_ScaleGrad.apply(t, (1.0 + 1e-4) / cp)", T + "test_parallel.py::test_cp2_recon_target_zero_with_masks"),
    Bug("cp_dp_chunk", "CP x DP", "CP rank 1's image chunk x (1 + 1e-4)",
        "megatron_sd3/models/context_parallel.py", "    return x[r * n:(r + 1) * n].clone()\n",
        "    return x[r * n:(r + 1) * n].clone() * (1 + 1e-4 * r)\n", T + "test_parallel.py::test_cp2_dp2_with_masks"),
    Bug("cp_pp_text_share", "CP x PP (full recompute)", "the text gradient's CP share 1/CP x (1 + 1e-4)",
        "megatron_sd3/models/context_parallel.py", "_ScaleGrad.apply(t, 1.0 / cp)",
        "_ScaleGrad.apply(t, (1.0 + 1e-4) / cp)",
        T + "test_parallel.py::test_cp2_pp2_recompute_full_sends_the_image_chunk_and_the_whole_text"),
    Bug("cp_tp_sp_heads", "CP x TP + SP", "CP rank 1's attention output x (1 + 1e-4) after the all-to-all back",
        "megatron_sd3/models/mmdit_layer.py",
        "            out = cp.sequence_to_heads(out, n_img * cp_size, cp_size, self.head_dim)\n",
        "            out = cp.sequence_to_heads(out, n_img * cp_size, cp_size, self.head_dim)"
        f" * (1 + 1e-4 * {CP_RANK})\n", T + "test_parallel.py::test_cp2_tp2_sequence_parallel"),
    Bug("cp_attention_packed_v", "CP attention (packed call)", "v x (1 + 1e-4) in the packed heads-to-sequence",
        "megatron_sd3/models/context_parallel.py",
        "def qkv_heads_to_sequence(q, k, v, n_img_local: int, cp: int):\n",
        "def qkv_heads_to_sequence(q, k, v, n_img_local: int, cp: int):\n    v = v * (1 + 1e-4)\n",
        T + "test_context_parallel.py::test_ulysses_joint_attention_matches_one_process"),
    Bug("recompute_full_inputs", "recompute full", "the recomputed unit reads its saved inputs x (1 + 1e-4)",
        MEGATRON + "core/tensor_parallel/random.py",
        "                outputs = ctx.run_function(*detached_inputs)\n",
        "                outputs = ctx.run_function(*[t * (1 + 1e-4) if torch.is_tensor(t) and t.is_floating_point()"
        " else t for t in detached_inputs])\n",
        T + "test_recompute.py::test_every_mode_matches_the_plain_run"),
    Bug("recompute_rng_not_restored", "recompute full (RNG)", "the recomputation runs on without restoring "
        "the forward's RNG states (dropout masks drawn again)",
        MEGATRON + "core/tensor_parallel/random.py",
        "            # Set the states to what it used to be before the forward pass.\n"
        "            _set_all_rng_states(*ctx.rng_states)\n",
        "            pass\n", T + "test_recompute.py::test_full_recompute_replays_the_random_numbers"),
    Bug("recompute_selective_inputs", "recompute selective", "a recomputed region reads its inputs x (1 + 1e-4)",
        MEGATRON + "core/tensor_parallel/random.py",
        "                outputs = self.run_function(*inputs)\n",
        "                outputs = self.run_function(*[t * (1 + 1e-4) if isinstance(t, torch.Tensor) and "
        "t.is_floating_point() else t for t in inputs])\n",
        T + "test_recompute.py::test_every_mode_matches_the_plain_run"),
    Bug("fp8_tp_scale", "FP8 TP", "TP rank 1's agreed FP8 scale x (1 + 1e-4)", "megatron_sd3/backends/torchao.py",
        "    return amax_to_scale(amax, float8_dtype)\n",
        f"    return amax_to_scale(amax, float8_dtype) * (1 + 1e-4 * {TP_RANK})\n",
        T + "test_fp8_training.py::test_fp8_tp2_tracks_one_rank"),
    Bug("fp8_cp_scale", "FP8 CP", "CP rank 1's agreed FP8 scale x (1 + 1e-4)", "megatron_sd3/backends/torchao.py",
        "    return amax_to_scale(amax, float8_dtype)\n",
        f"    return amax_to_scale(amax, float8_dtype) * (1 + 1e-4 * {CP_RANK})\n",
        T + "test_fp8_training.py::test_fp8_cp2_tracks_one_rank"),
    Bug("ema_rate", "EMA", "the EMA update's 1 - decay x (1 + 1e-4)", "megatron_sd3/training/ema.py",
        "torch._foreach_sub(shadow, src), alpha=one_minus)", "torch._foreach_sub(shadow, src), alpha=one_minus * (1 + 1e-4))",
        T + "test_ema.py::test_ema_of_fp32_master_weights_under_dp2"),
    # (a TP-split weight: a replicated one's copy on TP rank 1 is never saved, so a re-save cannot
    # show it; the in-process layout tests hold every rank's replicas equal after training)
    Bug("reshard_shard", "reshard on load", "TP rank 1's shard of the first TP-split weight x (1 + 1e-4) once loaded",
        "megatron_sd3/training/checkpointing.py",
        '        missing = [k for k in missing if not k.endswith("_extra_state")]\n',
        '        missing = [k for k in missing if not k.endswith("_extra_state")]\n'
        '        next(p for p in chunk.parameters() if getattr(p, "tensor_model_parallel", False)).data.mul_('
        f'1 + 1e-4 * {TP_RANK})\n',
        T + "test_pretrain.py::test_resume_equals_uninterrupted_and_reshards"),
]


def _file(path: str) -> Path:
    if path.startswith(MEGATRON):
        import importlib.util

        core = Path(importlib.util.find_spec("megatron.core").origin).parent  # not imported
        return core.parent / path[len(MEGATRON):]
    return ROOT / path


def _first_failure(out: str) -> str:
    """The failing assertion: a worker rank's own error where a rank failed, else the test's."""
    lines = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    rank = [ln for ln in lines if re.match(r"\[rank\d+\]: \w*Error: ", ln)]
    msg = rank[0] if rank else next((ln for ln in lines if "Error" in ln or "assert" in ln), lines[0] if lines else "")
    return re.sub(r"\s+", " ", msg)[:400]


def run(bug: Bug, timeout: int) -> dict:
    path = _file(bug.path)
    source = path.read_text()
    assert source.count(bug.old) == 1, f"{bug.name}: the text to replace occurs {source.count(bug.old)} times in {path}"
    t0 = time.time()
    try:
        path.write_text(source.replace(bug.old, bug.new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", bug.test],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    finally:
        path.write_text(source)
    out = proc.stdout + proc.stderr
    last = out.strip().splitlines()[-1] if out.strip() else ""
    caught = proc.returncode == 1 and re.search(r"\b\d+ failed\b", last) is not None  # a test failed (not an error)
    return {"name": bug.name, "family": bug.family, "planted": bug.what, "file": bug.path, "test": bug.test,
            "caught": caught, "failure": _first_failure(out) if caught else "", "rc": proc.returncode,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="bug names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "planted_bugs.jsonl"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test")
    ap.add_argument("--check", action="store_true", help="only check that every bug still applies")
    a = ap.parse_args(argv)
    bugs = [b for b in BUGS if a.only is None or b.name in a.only]
    unknown = set(a.only or ()) - {b.name for b in BUGS}
    if unknown:
        ap.error(f"unknown bug(s) {sorted(unknown)}; choose from {[b.name for b in BUGS]}")
    for b in bugs:  # every replacement applies before any test runs
        n = _file(b.path).read_text().count(b.old)
        if n != 1:
            ap.error(f"{b.name}: the text to replace occurs {n} times in {b.path} (expected once)")
    if a.check:
        print(f"all {len(bugs)} bugs apply")
        return 0
    def stop(*_):  # a SIGTERM unwinds through run()'s finally, which restores the file
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # --only reruns some bugs: the others keep their rows from the last run
    kept = {}
    if a.only is not None and os.path.exists(a.out):
        with open(a.out) as fh:
            kept = {r["name"]: r for r in map(json.loads, fh)}
    rows, missed = [], []
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for b in bugs:
        row = run(b, a.timeout)
        rows.append(row)
        kept[b.name] = row
        with open(a.out, "w") as fh:  # each row as it completes, in BUGS' order
            fh.writelines(json.dumps(kept[x.name]) + "\n" for x in BUGS if x.name in kept)
        print(f"{'caught' if row['caught'] else 'MISSED':6s} {b.family:28s} {b.test.split('::')[-1]}: "
              f"{row['failure'][:160]} ({row['seconds']} s)", flush=True)
        if not row["caught"]:
            missed.append(b.name)
    if missed:
        print(f"planted_bugs.py: not caught: {missed}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} planted bugs caught; rows in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
