#!/usr/bin/env bash
# The one GPU call: FP8 against bf16 where it matters, then the other GPU checks, on ONE GPU.
#
#   bash tools/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# For a GPU machine with torch + CUDA but no internet and no megatron-core / torchao. When
# those do not import, the wheels in .whl/fp8/ (megatron-core 0.16.1 cp312, torchao 0.18.0) are
# installed to /tmp/site with pip --no-index --no-deps (and .whl/extra/*.whl if that folder
# exists). Everything it writes goes to $OUT (default runs/gpu_check/): rows.jsonl (THE log: one
# JSON line per measured row, appended as each row completes, so a cut keeps every row before it),
# gpu_check.log (progress with timestamps), one log per step, the steps' JSON, fp8_train_tracking/.
#
# Steps, each under `timeout`, most valuable first, so the whole script stays inside --budget
# (default 480 s: one call of at most 8 minutes) and a cut drops the least valuable:
#   1. environment + imports (env.txt)
#   2. fp8_pays: tools/bench_throughput.py, sd3_light (15 blocks) at 1024 px, micro batch 4,
#      compiled blocks, text recon off: bf16, FP8 --fp8-gemms rule (fp8-rule), FP8 in every block
#      GEMM (fp8-local), each with its kernel-time profile; every row carries the step-time
#      model's planned_ms (tools/fp8_plan.py) and the planned memory (planned_mem_GiB) beside
#      the measured ms_per_iter and torch.cuda.max_memory_allocated (peak_mem_GiB)
#   3. fp8_pays_2432: the same three rows at SD3.5-large's width (hidden 2432, 38 heads of 64,
#      MLP 4x), 2 joint blocks
#   4. fp8_train_tracking: FP8 (every block GEMM) against bf16 loss over 50 steps on SD3-sized
#      blocks: tests/_fp8_train_worker.py with the sd3_light widths (2 joint blocks, hidden
#      1536, 333 text tokens of width 4096 -> padded to 336), 256 px, text recon on (gamma 0.5,
#      target 1), bf16 params; passes when the loss gap stays <= 5 % at every step
#   then, while the budget lasts (a step left under 10 s is skipped):
#   5. attention: tools/bench_attention.py, SDPA kernels at sd3_light's attention shapes
#   6. bench_graphs: CUDA graphs of the joint blocks (--compile graphs), bf16 and FP8 rule,
#      1024 px, with the kernel breakdown, GPU idle time and host syncs per iteration
#   7. sync_free_tests: the GPU halves of the sync-free tests (tests/multiprocess/test_sync_free.py,
#      tests/unit/test_flow_matching.py, tests/unit/test_prefetch.py)
#   8. bench_eager: bf16 and FP8 rule eager at 1024 px (what the compiler gains)
#   9. bench_rowwise: FP8 rowwise and one compiled region per FP8 GEMM, compiled, 1024 px
#  10. check_te (only where Transformer Engine imports): tools/check_te.py
#  11. bench_recon: text recon on, compiled, bf16 and FP8 rule
#  12. bench_256: 256 px (micro batch 32), compiled, bf16, FP8 rule and FP8 all
#  13. bench_data: tools/bench_data.py, the data path against one GPU's consumption
#  14. fp8_gpu_check: tools/fp8_gpu_check.py, the torchao FP8 linear pair at SD3 shapes
#  15. bench_width_W: bf16 against FP8 all at 2 blocks, hidden 3072 and 4096
# Without CUDA (a development machine) it runs steps 2-4 on the tiny preset on CPU, eager (the
# script itself is tested: tests/tools/test_gpu_check.py); --dry-run prints the commands of the
# GPU plan and runs nothing. After a GPU run: copy rows.jsonl and env.txt to docs/results/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BUDGET=480
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
ROWS=$OUT/rows.jsonl
: > "$LOG"
[ "$DRY" = 1 ] || : > "$ROWS"
FAILED=()

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# cap MAX RESERVE: a step's limit, at most MAX seconds and leaving RESERVE for the steps after it
# (never under half of what is left: a short --budget shrinks the first steps, it does not skip them)
cap() { local l=$(( $(left) - $2 )); [ $l -lt $(( $(left) / 2 )) ] && l=$(( $(left) / 2 ))
        [ $l -gt $1 ] && l=$1; echo $l; }

# step NAME LIMIT_S CMD...: run under timeout, log to $OUT/NAME.log, record failures.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    log "SKIP $name: only ${limit}s of the budget left"
    FAILED+=("$name(skipped)")
    return 1
  fi
  log "START $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    log "OK    $name"
  else
    [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s" || log "FAIL  $name rc=$rc"
    FAILED+=("$name(rc=$rc)")
    tail -n 30 "$OUT/$name.log" | sed 's/^/    | /' | tee -a "$LOG"
  fi
  return $rc
}

# --- 1. Python, wheels, imports ------------------------------------------------------------
# $PYTHON if given; else python3 when it sees a GPU; else the dev venv (CPU); else python3.
PY=${PYTHON:-}
IMPORTS=$DRY  # 1: megatron-core and torchao seen to import, or not probed (a dry run runs nothing)
if [ -z "$PY" ]; then
  PY=python3
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
     && [ -x "$ROOT/.venv/bin/python" ] \
     && { [ "$DRY" = 1 ] || "$ROOT/.venv/bin/python" -c "import megatron.core, torchao" 2>/dev/null; }; then
    PY=$ROOT/.venv/bin/python
    IMPORTS=1
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
if [ "$IMPORTS" = 0 ] && ! "$PY" -c "import megatron.core, torchao" 2>/dev/null; then
  WHEELS=$(ls "$ROOT"/.whl/fp8/*.whl "$ROOT"/.whl/extra/*.whl 2>/dev/null)
  if [ -z "$WHEELS" ]; then
    log "megatron-core/torchao not importable and no wheels in .whl/fp8/ (carry .whl with the run)"
    exit 3
  fi
  log "installing wheels to /tmp/site: $(echo $WHEELS | xargs -n1 basename | tr '\n' ' ')"
  if [ "$DRY" = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site $WHEELS 2>&1 | tail -n 5 | tee -a "$LOG"
  fi
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
log "python: $PY; CUDA: $CUDA; OUT: $OUT; budget ${BUDGET}s"
if [ "$DRY" = 1 ] && [ "$CUDA" = 0 ]; then
  log "--dry-run: printing the GPU plan (nothing runs)"
  CUDA=1
fi
if [ "$DRY" = 0 ]; then
  {
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for mod in ("numpy", "packaging", "megatron.core", "torchao", "transformer_engine"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(mod, "NOT importable:", type(e).__name__, str(e)[:200])
EOF
  } 2>&1 | grep -v -i -e "warn" -e "Failed to load" | tee "$OUT/env.txt" | sed 's/^/    /' | tee -a "$LOG"
  "$PY" -c "
import warnings; warnings.filterwarnings('ignore')
import megatron.core.distributed, megatron.core.optimizer, megatron.core.pipeline_parallel
import torchao.float8, megatron_sd3.training.step, megatron_sd3.backends.torchao" > "$OUT/imports.log" 2>&1 \
    || { log "imports FAILED:"; tail -n 20 "$OUT/imports.log" | tee -a "$LOG"; exit 4; }
  log "imports ok"
fi

# --- 2-15. the checks ----------------------------------------------------------------------
# bench NAME LIMIT ARGS...: tools/bench_throughput.py, each row appended to rows.jsonl as it
# completes (tagged with the step)
bench() { local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" tools/bench_throughput.py "$@" --time-budget $((limit - 15)) \
    --json "$OUT/$name.json" --rows-jsonl "$ROWS" --tag "$name"; }
# tracking NAME LIMIT ARGS...: the FP8-vs-bf16 training worker; its summary goes to rows.jsonl
tracking() { local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/$name"
  step "$name" "$limit" "$PY" tests/_fp8_train_worker.py "$@" --out "$OUT/$name"
  [ "$DRY" = 1 ] || "$PY" - "$OUT/$name.log" "$ROWS" "$name" <<'EOF'
import json, sys
log, rows, tag = sys.argv[1:]
for line in open(log):
    if line.startswith("FP8_TRAIN_SUMMARY"):
        s = json.loads(line.split(" ", 1)[1])
        gap = s.get("max_rel_loss_gap")
        s.update(tag=tag, passed=gap is not None and gap <= 0.05)
        with open(rows, "a") as fh:
            fh.write(json.dumps(s) + "\n")
EOF
}
COMMON=(--warmup 3 --iters 5 --recon off)
if [ "$CUDA" = 1 ]; then
  # 2-4: what FP8 buys (rule and all against bf16) at sd3_light's width and SD3.5-large's, and
  # whether FP8 training tracks bf16; each limit leaves the later of the three their time
  bench fp8_pays "$(cap 230 220)" --preset sd3_light --resolution 1024 --micro-batch-size 4 \
    "${COMMON[@]}" --variants bf16 fp8-rule fp8-local --compile on --profile
  bench fp8_pays_2432 "$(cap 140 80)" --preset sd3_light --num-layers 2 --hidden-size 2432 \
    --resolution 1024 --micro-batch-size 4 "${COMMON[@]}" --variants bf16 fp8-rule fp8-local \
    --compile on --profile
  tracking fp8_train_tracking "$(cap 75 0)" --preset sd3_light --num-layers 2 --latent 32 \
    --text-len 333 --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 --steps 50 --gbs 8 \
    --mbs 4 --lr 3e-4 --no-params
  # 5-15: the rest, while the budget lasts
  step attention "$(cap 45 5)" "$PY" tools/bench_attention.py --json "$OUT/attention.json"
  bench bench_graphs "$(cap 150 5)" --preset sd3_light --resolution 1024 --micro-batch-size 4 \
    "${COMMON[@]}" --variants bf16 fp8-rule --compile graphs --profile
  step sync_free_tests "$(cap 90 5)" "$PY" -m pytest -q -p no:cacheprovider \
    tests/multiprocess/test_sync_free.py tests/unit/test_flow_matching.py tests/unit/test_prefetch.py
  bench bench_eager "$(cap 120 5)" --preset sd3_light --resolution 1024 --micro-batch-size 4 \
    "${COMMON[@]}" --variants bf16 fp8-rule --compile off --profile
  bench bench_rowwise "$(cap 120 5)" --preset sd3_light --resolution 1024 --micro-batch-size 4 \
    "${COMMON[@]}" --variants fp8-rowwise fp8-per-gemm --compile on --profile
  if "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    step check_te "$(cap 90 5)" "$PY" tools/check_te.py --preset sd3_light --num-layers 2 --latent 32 \
      --json "$OUT/check_te.json"
  else
    log "Transformer Engine not importable: no TE rows, tools/check_te.py skipped"
  fi
  bench bench_recon "$(cap 130 5)" --preset sd3_light --resolution 1024 --micro-batch-size 4 \
    --warmup 3 --iters 5 --recon on --variants bf16 fp8-rule --compile on
  bench bench_256 "$(cap 150 5)" --preset sd3_light --resolution 256 --micro-batch-size 32 \
    "${COMMON[@]}" --variants bf16 fp8-rule fp8-local --compile on
  step bench_data "$(cap 60 5)" "$PY" tools/bench_data.py --step-ms 294 --gpu-samples-per-step 4
  step fp8_gpu_check "$(cap 120 5)" "$PY" tools/fp8_gpu_check.py --out "$OUT"
  for W in 3072 4096; do
    bench "bench_width_$W" "$(cap 150 5)" --preset sd3_light --num-layers 2 --hidden-size "$W" \
      --resolution 1024 --micro-batch-size 4 "${COMMON[@]}" --variants bf16 fp8-local --compile on
  done
else
  log "no CUDA: steps 2-4 on the tiny preset on CPU, eager (tests the script; numbers mean nothing)"
  bench fp8_pays "$(cap 120 100)" --resolution 64 --warmup 1 --iters 2 --recon off \
    --variants bf16 fp8-rule fp8-local --compile off --profile
  bench fp8_pays_2432 "$(cap 90 60)" --hidden-size 128 --num-layers 2 --resolution 64 --warmup 1 \
    --iters 2 --recon off --variants bf16 fp8-rule fp8-local --compile off
  tracking fp8_train_tracking "$(cap 120 0)" --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 \
    --steps 5 --no-params
fi

# --- summary ---------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
print("==== summary ====")
rows_path = os.path.join(out, "rows.jsonl")
rows = [json.loads(l) for l in open(rows_path)] if os.path.exists(rows_path) else []
log = os.path.join(out, "bench_data.log")
if os.path.exists(log):
    lines = [l.strip() for l in open(log) if l.startswith(("one GPU", "loader", "prefetched"))]
    print("--- data path (tools/bench_data.py) ---")
    for l in lines:
        print("  " + l)
for s in (r for r in rows if "scaled_mm_calls" in r):
    gap = s.get("max_rel_loss_gap")
    print(f"FP8 vs bf16 loss tracking ({s['tag']}): max rel gap "
          f"{'n/a' if gap is None else f'{gap:.2e}'} over {s['steps']} steps "
          f"({'PASS' if s['passed'] else 'FAIL'}, bound 5%), scaled_mm calls {s['scaled_mm_calls']}")
    print("  fp8 :", s["loss"])
    print("  bf16:", s.get("ref_loss"))
p = os.path.join(out, "attention.json")
if os.path.exists(p):
    d = json.load(open(p))
    print(f"--- attention.json ({d['device']}, {d['dtype']}) ---")
    for r in d["rows"]:
        print(f"  {r['case']:16s} {r['tokens']:6d} {r['backend']:10s} " + (
            f"cannot run: {r['error'][:60]}" if "error" in r else
            f"fwd {r['fwd_ms']:7.2f} ms  fwd+bwd {r['fwd_bwd_ms']:7.2f} ms  {r['fwd_bwd_tflops']} TFLOP/s"))
# the bench rows, from the one log (rows.jsonl), in the order they were measured
for tag in dict.fromkeys(r.get("tag") for r in rows if "variant" in r):
    print(f"--- {tag} ({next(r.get('device') for r in rows if r.get('tag') == tag)}) ---")
    for r in (r for r in rows if r.get("tag") == tag and "variant" in r):
        if "error" in r:
            print(f"  {r['variant']:12s} recon {r['text_recon']:3s} {r.get('resolution', '-')}px: {r['error']}")
            continue
        mfu = r.get("mfu_bf16_peak")
        mem = r.get("peak_mem_GiB", r.get("rss_MiB"))
        print(f"  {r['variant']:12s} recon {r['text_recon']:3s} h {r['hidden_size']:4d} x {r['num_layers']:2d}"
              f" {r['resolution']:5d}px mb {r['micro_batch']:3d}"
              f" {('graphs  ' if r.get('compile_mode') == 'reduce-overhead' else 'compiled') if r['compiled'] else 'eager   '}"
              f" {r['ms_per_iter']:9.1f} ms/iter (planned {r.get('planned_ms')})"
              f" {r['samples_per_s']:8.2f} samples/s"
              f" MFU(bf16 peak) {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
              f" mem {mem} (planned {r.get('planned_mem_GiB')} GiB)")
        if r.get("fp8_gemms") == "rule":
            print(f"      FP8 by the rule: {', '.join(r.get('planned_fp8_gemms') or []) or 'none'}")
        kt = r.get("kernel_time")
        if kt:
            print(f"      kernels {kt['kernel_ms_per_iter']} ms/iter of {kt['wall_ms_per_iter_profiled']} wall:",
                  ", ".join(f"{k} {v}" for k, v in kt["by_class_ms"].items()))
            print("      top:", "; ".join(f"{n[:60]} {ms}" for n, ms in kt["top_kernels_ms"][:6]))
            print(f"      GPU idle {kt.get('gpu_idle_ms_per_iter')} ms/iter; its causes: "
                  f"{kt.get('kernels_per_iter')} kernel launches and {r.get('host_syncs_per_iter')} host syncs per iteration")
    base = {(r["resolution"], r["hidden_size"]): r["ms_per_iter"] for r in rows
            if r.get("tag") == tag and r.get("variant") in ("bf16", "fp32") and "error" not in r}
    for r in rows:
        key = (r.get("resolution"), r.get("hidden_size"))
        if r.get("tag") == tag and str(r.get("variant")).startswith("fp8") and "error" not in r and key in base:
            print(f"  {r['variant']} vs bf16 at {key[0]} px, hidden {key[1]}: {base[key] / r['ms_per_iter']:.3f}x")
EOF
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  log "DONE with problems: ${FAILED[*]}"
  exit 1
fi
log "DONE: all steps ok"
