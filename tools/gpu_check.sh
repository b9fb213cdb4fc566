#!/usr/bin/env bash
# FP8 correctness checks + throughput benchmark on ONE GPU, in one go.
#
#   bash tools/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# For a GPU machine with torch + CUDA but no internet and no megatron-core / torchao. When
# those do not import, the wheels in .whl/fp8/ (megatron-core 0.16.1 cp312, torchao 0.18.0) are
# installed to /tmp/site with pip --no-index --no-deps (and .whl/extra/*.whl if that folder
# exists). Everything it writes goes to $OUT (default runs/gpu_check/): gpu_check.log (progress
# with timestamps), one log per step, attention.json, bench*.json, fp8_train/.
#
# Steps (GPU), each under `timeout` so the whole script stays inside --budget (default 540 s),
# in order of value (a cut keeps the most important results):
#   1. environment + imports
#   2. tools/bench_attention.py: SDPA kernels (flash, cuDNN, mem-efficient) at sd3_light's
#      attention shapes, with and without a text-pad mask
#   3. tools/bench_throughput.py: sd3_light (15 blocks) at 1024 px (micro batch 4), bf16 vs FP8
#      (torchao; TE too if installed), text recon off, eager and with the joint blocks
#      torch.compile'd (compile time excluded), kernel-time profile per row
#   3b. CUDA graphs: the joint blocks as torch.compile mode reduce-overhead
#      (--torch-compile-mode reduce-overhead), bf16 and FP8, 1024 px (micro batch 4) and 256 px
#      (micro batch 32), with the kernel breakdown, GPU idle time (profiled wall - kernel time)
#      and host syncs per iteration (CUDA sync debug mode) of each row; compare with step 3
#   3c. the GPU halves of the sync-free tests: no synchronising call in a microbatch
#      (torch.cuda.set_sync_debug_mode("error")), device-side noise layout-independent, pinned
#      prefetch, CUDA-graph training == default-mode training (tests/multiprocess/test_sync_free.py,
#      tests/unit/test_flow_matching.py, tests/unit/test_prefetch.py)
#   3d. tools/bench_data.py: samples/s of the data path at sd3_light's 1024 px sample against
#      one GPU's consumption at the measured step time
#   3e. FP8 rowwise (torchao's recipe: per-row scales, all e4m3) against tensorwise, compiled,
#      1024 px, with the kernel breakdown
#   4. FP8 vs bf16 loss tracking on SD3-sized blocks: tests/_fp8_train_worker.py with the
#      sd3_light widths (2 joint blocks, hidden 1536, 24 heads, 333 text tokens of width 4096 ->
#      padded to 336), 256 px, text recon on (gamma 0.5, target 1), bf16 params, 10 steps of the
#      real training path; passes when the loss gap stays <= 5 % at every step
#   4b. only where Transformer Engine imports: tools/check_te.py (TE vs local, same weights)
#   5. text recon on at 1024 px, compiled, bf16 and FP8
#   6. if step 2 found a kernel faster than flash for the joint attention: step 3's compiled
#      1024 px rows with --attention-backend set to it
#   7. 256 px (micro batch 32), compiled, bf16 and FP8
#   8. tools/fp8_gpu_check.py: the torchao FP8 linear pair at SD3 shapes (errors vs fp32, 333 vs
#      336 tokens, MLP throughput bf16 vs FP8, eager and compiled) -> fp8_gpu.json
#   9. where FP8 starts to pay: bf16 against FP8 (torchao, compiled) at 1024 px, micro batch 4,
#      2 joint blocks, widened to hidden 3072, 4096 and 2304 (heads of 64, MLP 4x), in that order
# Without CUDA (a development machine) it runs the same chain on the tiny preset on CPU, so the
# script itself is tested; --dry-run only prints the commands of the GPU plan.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BUDGET=540
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,46p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
FAILED=()

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }

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
if [ -z "$PY" ]; then
  PY=python3
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
     && [ -x "$ROOT/.venv/bin/python" ] \
     && "$ROOT/.venv/bin/python" -c "import megatron.core, torchao" 2>/dev/null; then
    PY=$ROOT/.venv/bin/python
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
if ! "$PY" -c "import megatron.core, torchao" 2>/dev/null; then
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

# --- 2-6. the checks -----------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
  # Order by value: each step's JSON is rewritten after every row, so a cut keeps what it had.
  # 2. SDPA kernels at sd3_light's attention shapes (which backend; what a pad mask costs)
  step attention 45 "$PY" tools/bench_attention.py --json "$OUT/attention.json"
  # 3. the throughput table: bf16 and FP8 (torchao; TE too if installed), 1024 px (micro batch 4),
  #    text recon off, eager then compiled blocks, each row followed by a 2-iteration profile
  LIM=$(( $(left) - 150 )); [ $LIM -gt 250 ] && LIM=250
  step bench "$LIM" \
    "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \
      --warmup 3 --iters 5 --variants bf16 fp8-local fp8-te --recon off --compile both --profile \
      --time-budget $((LIM - 20)) --json "$OUT/bench.json"
  # 3b. CUDA graphs of the joint blocks (torch.compile reduce-overhead), 1024 px and 256 px, with
  #     kernel breakdown, GPU idle time and host syncs per iteration per row
  if [ "$(left)" -ge 150 ]; then
    LIM=$(( $(left) - 120 )); [ $LIM -gt 180 ] && LIM=180
    step bench_graphs "$LIM" \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 256 --micro-batch-size 4 32 \
        --warmup 3 --iters 5 --variants bf16 fp8-local --recon off --compile graphs --profile \
        --time-budget $((LIM - 20)) --json "$OUT/bench_graphs.json"
  fi
  # 3c. the sync-free tests' GPU halves (sync debug mode, device RNG, pinning, CUDA-graph training)
  step sync_free_tests $(( $(left) - 5 < 90 ? $(left) - 5 : 90 )) \
    "$PY" -m pytest -q -p no:cacheprovider tests/multiprocess/test_sync_free.py tests/unit/test_flow_matching.py tests/unit/test_prefetch.py
  # 3d. the data path against one GPU's consumption (sd3_light, 1024 px, micro batch 4, 294 ms)
  step bench_data $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) \
    "$PY" tools/bench_data.py --step-ms 294 --gpu-samples-per-step 4
  # 3e. FP8 rowwise against tensorwise, and a graph break at every FP8 GEMM against one graph per
  #     block (compiled, 1024 px; compare with step 3's compiled fp8-local rows)
  if [ "$(left)" -ge 150 ]; then
    LIM=$(( $(left) - 120 )); [ $LIM -gt 120 ] && LIM=120
    step bench_rowwise "$LIM" \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \
        --warmup 3 --iters 5 --variants fp8-rowwise fp8-per-gemm --recon off --compile on --profile \
        --time-budget $((LIM - 15)) --json "$OUT/bench_rowwise.json"
  fi
  # 4. FP8 vs bf16 loss tracking on SD3-sized blocks (333 text tokens -> padded 336, gamma 0.5)
  mkdir -p "$OUT/fp8_train"
  step fp8_train_tracking $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) \
    "$PY" tests/_fp8_train_worker.py --preset sd3_light --num-layers 2 --latent 32 --text-len 333 \
      --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 --steps 10 --gbs 8 --mbs 4 --lr 3e-4 \
      --no-params --out "$OUT/fp8_train"
  # 4b. where Transformer Engine imports: TE against the local filling on the same weights
  if "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    step check_te 90 "$PY" tools/check_te.py --preset sd3_light --num-layers 2 --latent 32 \
      --json "$OUT/check_te.json"
  else
    log "Transformer Engine not importable: no TE rows, tools/check_te.py skipped"
  fi
  # 5. text recon on (compiled; compare with the recon-off compiled rows of step 3)
  if [ "$(left)" -ge 70 ]; then
    LIM=$(( $(left) - 5 )); [ $LIM -gt 130 ] && LIM=130
    step bench_recon "$LIM" \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \
        --warmup 3 --iters 5 --variants bf16 fp8-local --recon on --compile on \
        --time-budget $((LIM - 15)) --json "$OUT/bench_recon.json"
  fi
  # 6. the fastest attention kernel of step 2, if it is not flash (torch's first choice)
  FASTEST=$("$PY" -c "
import json
rows = [r for r in json.load(open('$OUT/attention.json'))['rows'] if r['case'] == 'joint' and 'error' not in r]
print(min(rows, key=lambda r: r['fwd_bwd_ms'])['backend'] if rows else 'flash')" 2>/dev/null || echo flash)
  if [ "$FASTEST" != flash ] && [ "$(left)" -ge 70 ]; then
    step bench_attention_backend $(( $(left) - 5 )) \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \
        --warmup 3 --iters 5 --variants bf16 fp8-local --recon off --compile on \
        --attention-backend "$FASTEST" --time-budget $(( $(left) - 20 )) --json "$OUT/bench_$FASTEST.json"
  fi
  # 7. 256 px (micro batch 32), compiled, bf16 and FP8
  if [ "$(left)" -ge 80 ]; then
    step bench_256 $(( $(left) - 5 )) \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 256 --micro-batch-size 32 \
        --warmup 3 --iters 5 --variants bf16 fp8-local --recon off --compile on \
        --time-budget $(( $(left) - 25 )) --json "$OUT/bench_256.json"
  fi
  # 8. the torchao FP8 linear pair on its own (SD3 shapes)
  if [ "$(left)" -ge 60 ]; then
    LIM=$(( $(left) - 5 )); [ $LIM -gt 120 ] && LIM=120
    step fp8_gpu_check "$LIM" "$PY" tools/fp8_gpu_check.py --out "$OUT"
  fi
  # 9. the width at which FP8 starts to pay (2 blocks, compiled, 1024 px)
  for W in 3072 4096 2304; do
    if [ "$(left)" -ge 90 ]; then
      LIM=$(( $(left) - 5 )); [ $LIM -gt 150 ] && LIM=150
      step "bench_width_$W" "$LIM" \
        "$PY" tools/bench_throughput.py --preset sd3_light --num-layers 2 --hidden-size "$W" \
          --resolution 1024 --micro-batch-size 4 --warmup 3 --iters 5 --variants bf16 fp8-local \
          --recon off --compile on --time-budget $((LIM - 15)) --json "$OUT/bench_width_$W.json"
    fi
  done
else
  log "no CUDA: CPU version on the tiny preset (tests the script; numbers mean nothing)"
  step attention 60 "$PY" tools/bench_attention.py --json "$OUT/attention.json"
  step bench 300 \
    "$PY" tools/bench_throughput.py --resolution 64 --warmup 1 --iters 2 --variants bf16 fp8-local \
      fp8-rowwise --recon off --compile both --profile --json "$OUT/bench.json"
  step bench_width_128 120 \
    "$PY" tools/bench_throughput.py --hidden-size 128 --num-layers 2 --resolution 64 --warmup 1 \
      --iters 2 --variants bf16 fp8-local --recon off --json "$OUT/bench_width_128.json"
  step sync_free_tests 120 \
    "$PY" -m pytest -q -p no:cacheprovider tests/multiprocess/test_sync_free.py tests/unit/test_prefetch.py
  step bench_data 60 "$PY" tools/bench_data.py --num-samples 16 --latent-size 32 --global-batch-size 8 --iterations 2
  mkdir -p "$OUT/fp8_train"
  step fp8_train_tracking 120 \
    "$PY" tests/_fp8_train_worker.py --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 \
      --steps 5 --no-params --out "$OUT/fp8_train"
fi

# --- summary ---------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
print("==== summary ====")
log = os.path.join(out, "bench_data.log")
if os.path.exists(log):
    lines = [l.strip() for l in open(log) if l.startswith(("one GPU", "loader", "prefetched"))]
    print("--- data path (tools/bench_data.py) ---")
    for l in lines:
        print("  " + l)
log = os.path.join(out, "fp8_train_tracking.log")
if os.path.exists(log):
    for line in open(log):
        if line.startswith("FP8_TRAIN_SUMMARY"):
            s = json.loads(line.split(" ", 1)[1])
            gap = s.get("max_rel_loss_gap")
            ok = gap is not None and gap <= 0.05
            print(f"FP8 vs bf16 loss tracking: max rel gap {gap:.2e} over {s['steps']} steps "
                  f"({'PASS' if ok else 'FAIL'}, bound 5%), scaled_mm calls {s['scaled_mm_calls']}")
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
names = sorted(n for n in os.listdir(out) if n.startswith("bench") and n.endswith(".json"))
for name in names:
    p = os.path.join(out, name)
    if not os.path.exists(p):
        continue
    d = json.load(open(p))
    print(f"--- {name} ({d.get('device')}, complete={d.get('complete')}) ---")
    for r in d["rows"]:
        if "error" in r:
            print(f"  {r['variant']:9s} recon {r['text_recon']:3s} {r.get('resolution', '-')}px: {r['error']}")
            continue
        mfu = r.get("mfu_bf16_peak")
        mem = r.get("peak_mem_GiB", r.get("rss_MiB"))
        print(f"  {r['variant']:9s} recon {r['text_recon']:3s} {r['resolution']:5d}px mb {r['micro_batch']:3d}"
              f" {('graphs  ' if r.get('compile_mode') == 'reduce-overhead' else 'compiled') if r['compiled'] else 'eager   '}"
              f" {r['ms_per_iter']:9.1f} ms/iter"
              f" {r['samples_per_s']:8.2f} samples/s {r['tflops_per_device']:8.3g} TFLOP/s"
              f" MFU(bf16 peak) {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} mem {mem}"
              f" (before build {r.get('mem_before_build_GiB')})")
        kt = r.get("kernel_time")
        if kt:
            print(f"      kernels {kt['kernel_ms_per_iter']} ms/iter of {kt['wall_ms_per_iter_profiled']} wall:",
                  ", ".join(f"{k} {v}" for k, v in kt["by_class_ms"].items()))
            print("      top:", "; ".join(f"{n[:60]} {ms}" for n, ms in kt["top_kernels_ms"][:6]))
            print(f"      GPU idle {kt.get('gpu_idle_ms_per_iter')} ms/iter, host syncs per iteration "
                  f"{r.get('host_syncs_per_iter')}")
    for res, s in (d.get("summary") or {}).items():
        extra = {k: v for k, v in s.items() if not isinstance(v, dict)}
        if extra:
            print(f"  {res}px: {extra}")
EOF
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  log "DONE with problems: ${FAILED[*]}"
  exit 1
fi
log "DONE: all steps ok"
