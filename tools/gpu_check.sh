#!/usr/bin/env bash
# FP8 correctness checks + throughput benchmark on ONE GPU, in one go (issue 6).
#
#   bash tools/gpu_check.sh [--dry-run] [--no-compile] [--budget SECONDS]
#
# Made for the lent GPU machine: torch + CUDA, no internet, no megatron-core / torchao. When
# those do not import, the wheels in .whl/fp8/ (megatron-core 0.16.1 cp312, torchao 0.18.0) are
# installed to /tmp/site with pip --no-index --no-deps (and .whl/extra/*.whl if that folder
# exists). Everything it writes goes to $OUT (default runs/gpu_check/): gpu_check.log (progress
# with timestamps), one log per step, fp8_gpu.json, fp8_train/, bench.json, bench_compiled.json.
#
# Steps (GPU), each under `timeout` so the whole script stays inside --budget (default 330 s),
# in order of value (a cut keeps the most important results):
#   1. environment + imports
#   2. tools/bench_throughput.py, eager: sd3_light (15 blocks) at 1024 px (micro batch 4) and
#      256 px (micro batch 32), bf16 vs FP8 (torchao; TE too if installed), text recon off/on
#   3. FP8 vs bf16 loss tracking on SD3-sized blocks: tests/_fp8_train_worker.py with the
#      sd3_light widths (2 joint blocks, hidden 1536, 24 heads, 333 text tokens of width 4096 ->
#      padded to 336), 256 px, text recon on (gamma 0.5, target 1), bf16 params, 10 steps of the
#      real training path; passes when the loss gap stays <= 5 % at every step
#   4. unless --no-compile and if >= 100 s remain: the bench at 1024 px, recon off, FP8 then
#      bf16, with the joint blocks torch.compile'd (compile time excluded from ms/iter)
#   5. if >= 40 s remain: tests/_fp8_gpu_check.py --no-compile (FP8 vs bf16 vs fp32 on one MMDiT
#      MLP at SD3 sizes, the 333-token case, eager MLP timing)
# Without CUDA (a development machine) it runs the same chain on the tiny preset on CPU, so the
# script itself is tested; --dry-run only prints the commands of the GPU plan.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BUDGET=330
COMPILE=1
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-compile) COMPILE=0 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
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
import torchao.float8, megatron_sd3.training.step, megatron_sd3.fp8" > "$OUT/imports.log" 2>&1 \
    || { log "imports FAILED:"; tail -n 20 "$OUT/imports.log" | tee -a "$LOG"; exit 4; }
  log "imports ok"
fi

# --- 2-5. the checks -----------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
  # Order by value: the throughput table first (its JSON is rewritten after every row, so a cut
  # keeps what was measured), then FP8-vs-bf16 training on SD3-sized blocks, then the rest.
  BENCH_LIMIT=$(( $(left) - 70 ))
  [ $BENCH_LIMIT -gt 190 ] && BENCH_LIMIT=190
  step bench "$BENCH_LIMIT" \
    "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 256 --micro-batch-size 4 32 \
      --warmup 3 --iters 5 --variants bf16 fp8-local fp8-te --recon off on \
      --time-budget $((BENCH_LIMIT - 25)) --json "$OUT/bench.json"
  mkdir -p "$OUT/fp8_train"
  step fp8_train_tracking $(( $(left) - 5 < 65 ? $(left) - 5 : 65 )) \
    "$PY" tests/_fp8_train_worker.py --preset sd3_light --num-layers 2 --latent 32 --text-len 333 \
      --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 --steps 10 --gbs 8 --mbs 4 --lr 3e-4 \
      --no-params --out "$OUT/fp8_train"
  if [ "$COMPILE" = 1 ] && [ "$(left)" -ge 100 ]; then
    step bench_compiled $(( $(left) - 5 )) \
      "$PY" tools/bench_throughput.py --preset sd3_light --resolution 1024 --micro-batch-size 4 \
        --warmup 3 --iters 5 --variants fp8-local bf16 --recon off --compile on \
        --time-budget $(( $(left) - 40 )) --json "$OUT/bench_compiled.json"
  fi
  if [ "$(left)" -ge 40 ]; then
    step fp8_layer_check $(( $(left) - 5 )) "$PY" tests/_fp8_gpu_check.py --no-compile --out "$OUT"
  fi
else
  log "no CUDA: CPU version on the tiny preset (tests the script; numbers mean nothing)"
  mkdir -p "$OUT/fp8_train"
  step fp8_train_tracking 120 \
    "$PY" tests/_fp8_train_worker.py --fp8 hybrid --bf16 --ref bf16 --gamma 0.5 --target 1 \
      --steps 5 --no-params --out "$OUT/fp8_train"
  step bench 120 \
    "$PY" tools/bench_throughput.py --resolution 64 --warmup 1 --iters 2 --json "$OUT/bench.json"
  if [ "$COMPILE" = 1 ]; then
    step bench_compiled $(( $(left) - 5 )) \
      "$PY" tools/bench_throughput.py --resolution 64 --warmup 1 --iters 2 --variants fp8-local \
        --recon off --compile on --time-budget 60 --json "$OUT/bench_compiled.json"
  fi
fi

# --- summary ---------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
print("==== summary ====")
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
p = os.path.join(out, "fp8_gpu.json")
if os.path.exists(p):
    d = json.load(open(p))
    for k in ("device", "rel_err_vs_fp32_bf16", "rel_err_vs_fp32_hybrid", "rel_err_vs_fp32_e4m3",
              "tokens_333", "mlp_bench_1024px_mb4", "errors"):
        if k in d:
            print(f"fp8_gpu_check {k}: {d[k]}")
for name in ("bench.json", "bench_compiled.json"):
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
              f" {'compiled' if r['compiled'] else 'eager   '} {r['ms_per_iter']:9.1f} ms/iter"
              f" {r['samples_per_s']:8.2f} samples/s {r['tflops_per_device']:8.3g} TFLOP/s"
              f" MFU(bf16 peak) {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} mem {mem}")
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
