#!/usr/bin/env bash
# The GPU check: one prepared script whose first minutes produce the key ratios (docs/gpu.md, "Running the GPU
# check", with a budget table). Install the offline vLLM 0.25.1 kit first; then
#
#   bash scripts/gpu_check.sh OUTDIR            # phase1, phase2, then compiled (as far as the device time goes)
#   bash scripts/gpu_check.sh OUTDIR phase1     # build, kernel tests, then the ratios: stock vs attncap (no capture,
#                                               # stats all layers, last-layer head-mean rows), batch 1 and 16,
#                                               # both engines FULL_DECODE_ONLY without torch.compile   (~6.5 min)
#   bash scripts/gpu_check.sh OUTDIR phase2     # end-to-end correctness vs HF eager (bf16), full graph vs eager,
#                                               # tokens vs stock, then the fused kernel's timing         (~4.5 min)
#   bash scripts/gpu_check.sh OUTDIR compiled   # last: the ratios and the e2e test with default compilation (two
#                                               # cold torch.compile starts, ~3 min each)
#
# Every step writes its log (and pytest a JUnit XML) into OUTDIR, every phase a JSON summary
# (OUTDIR/<phase>.json: step, rc, seconds) and one summary line; a failed or timed-out step never stops the phase.
# Only GPU tests run here (-m gpu): the CPU-only tests belong to CI. Each step has its own cap (below); the caps add
# up to more than the expected times, so a hang costs one step, not the run. Env: PY (default python3),
# ATTNCAP_CUDA_ARCHS (default 9.0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-$PWD/runs/gpu_check}}
shift || true
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -f /tmp/kit/env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/kit/env.sh
else
  echo "[gpu_check] WARNING: /tmp/kit/env.sh not found: install the offline vLLM kit first (docs/gpu.md)" | tee -a "$OUT/gpu_check.log"
fi
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}  # flashinfer is not in the kit
PY=${PY:-python3}
STEPS=()

step() {  # step NAME TIMEOUT CMD... : log, time and record one step; never stops the phase
  local name=$1 to=$2; shift 2
  local t0 rc
  echo "=== [$name] $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/gpu_check.log"
  t0=$(date +%s)
  timeout "$to" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log" | tee -a "$OUT/gpu_check.log"
  local dt=$(( $(date +%s) - t0 ))
  echo "[$name] rc=$rc ${dt}s" | tee -a "$OUT/gpu_check.log"
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt}")
}

phase_summary() {  # phase_summary PHASE T0
  local phase=$1 t0=$2 failed=0 s
  for s in "${STEPS[@]}"; do case $s in *'"rc": 0,'*) ;; *) failed=$((failed + 1)) ;; esac; done
  local joined
  joined=$(IFS=,; echo "${STEPS[*]}")
  echo "{\"phase\": \"$phase\", \"seconds\": $(( $(date +%s) - t0 )), \"failed\": $failed, \"steps\": [$joined]}" > "$OUT/$phase.json"
  echo "SUMMARY $phase: ${#STEPS[@]} steps, $failed failed, $(( $(date +%s) - t0 ))s -> $OUT/$phase.json" | tee -a "$OUT/gpu_check.log"
  STEPS=()
}

ENV_PY='
import importlib.metadata as md, json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import vllm
    info["vllm"] = vllm.__version__
except Exception as e:
    info["vllm"] = f"NOT importable: {e}"
from vllm_attncap.engine.cuda import kernels as cuda
info["kernels"] = cuda.is_available()
info["entry_points"] = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
print(json.dumps(info))
'

pytest_step() {  # pytest_step NAME TIMEOUT ARGS...
  local name=$1 to=$2; shift 2
  step "$name" "$to" "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@"
}

phase1() {  # what matters most first: build, kernel correctness, then the no-capture / stats / rows ratios
  local t0; t0=$(date +%s)
  step build 150 env ATTNCAP_BUILD_KERNELS=1 ATTNCAP_CUDA_ARCHS="${ATTNCAP_CUDA_ARCHS:-9.0}" \
    ATTNCAP_BUILD_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
  # the entry point lets spawned engine processes load the plugin (the kernels are already in place)
  step entry-point 60 env ATTNCAP_BUILD_KERNELS=0 "$PY" -m pip install -q -e . --no-deps --no-build-isolation
  step env 30 "$PY" -c "$ENV_PY"
  pytest_step kernel-tests 150 -m gpu tests/gpu/test_decode_kernel.py tests/gpu/test_kernels.py
  # stock FLASH_ATTN, then attncap (nobody captures / stats of all layers / last-layer head-mean rows);
  # FULL_DECODE_ONLY with compilation mode 0: no cold torch.compile (the backend is part of its cache key)
  step ratios 300 "$PY" benchmarks/capture_overhead.py --quick --full-decode-only --no-hf --models smollm2-135m \
    --json "$OUT/ratios.json"
  phase_summary phase1 "$t0"
}

phase2() {  # correctness end to end (engines without torch.compile), then the kernel's own timing
  local t0; t0=$(date +%s)
  # one bf16 eager engine (module fixture) + HF fp32 and bf16: rows, statistics, kernel vs torch path, chunked
  # prefill, prefix cache (-k bfloat16 keeps the fp16 engine out)
  pytest_step e2e-hf 200 -s -m "gpu and not slow" -k "bfloat16 and not tokens_identical" \
    tests/gpu/test_flash_backend_e2e.py
  # two more engines: the eager path vs FULL_DECODE_ONLY graphs with in-graph capture and preemption
  pytest_step e2e-graph 150 -s -m "gpu and not slow" -k "full_graph" tests/gpu/test_flash_backend_e2e.py
  # one more engine (stock FLASH_ATTN): tokens equal up to near-ties
  pytest_step e2e-tokens 120 -s -m "gpu and not slow" -k "bfloat16 and tokens_identical" \
    tests/gpu/test_flash_backend_e2e.py
  step kernel-bench 60 "$PY" benchmarks/kernel_bench.py --decode --quick
  phase_summary phase2 "$t0"
}

compiled() {  # default compilation: two cold torch.compile starts (stock and attncap have separate cache keys)
  local t0; t0=$(date +%s)
  step ratios-compiled 480 "$PY" benchmarks/capture_overhead.py --quick --no-hf --no-piecewise --models smollm2-135m \
    --json "$OUT/ratios_compiled.json"
  pytest_step e2e-compiled 420 -s -m "gpu and slow" tests/gpu/test_flash_backend_e2e.py
  phase_summary compiled "$t0"
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(phase1 phase2 compiled)
for p in "${phases[@]}"; do
  case $p in
    phase1) phase1 ;;
    phase2) phase2 ;;
    compiled) compiled ;;
    *) echo "usage: $0 OUTDIR [phase1|phase2|compiled]..." >&2; exit 2 ;;
  esac
done
echo "=== recap"; grep -h "^SUMMARY" "$OUT/gpu_check.log" | tail -n ${#phases[@]}
exit 0
