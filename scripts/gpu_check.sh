#!/usr/bin/env bash
# The GPU check: one prepared script that fits a 15-minute device budget from a bare machine
# (docs/gpu.md, "Running the GPU check"). Install the offline vLLM 0.25.1 kit first; then
#
#   bash scripts/gpu_check.sh OUTDIR            # phase 1 then phase 2
#   bash scripts/gpu_check.sh OUTDIR phase1     # build, kernel tests vs the torch reference, bf16 e2e vs HF eager,
#                                               # full graph vs eager, sync-debug test, then the fused kernel's
#                                               # timing in a CUDA graph (kernel_bench --decode --quick)   (<= 6 min)
#   bash scripts/gpu_check.sh OUTDIR phase2     # capture_overhead.py --quick, SmolLM2 shape, batch 1 and 16,
#                                               # vs stock default, stock PIECEWISE, HF eager (target <= 4.5 min)
#   bash scripts/gpu_check.sh OUTDIR compiled   # extra: the default-compilation e2e test (cold torch.compile)
#
# Every step writes its log (and pytest a JUnit XML) into OUTDIR, every phase a JSON summary
# (OUTDIR/<phase>.json: step, rc, seconds) and one summary line; a failed step never stops the phase.
# Only GPU tests run here (-m gpu): the CPU-only tests belong to CI. Step caps: build 180 s, entry point 90 s,
# kernel tests PHASE1_TIMEOUT_S/2, e2e PHASE1_TIMEOUT_S (default 300), kernel bench 60 s, phase 2
# PHASE2_TIMEOUT_S (default 270): phase 1 is ~5.5 min when nothing hangs (an estimate, not measured), ~14 min if every step hits its
# cap (logs are written as they go, so a device call cut short still returns them). Env: PY (default python3),
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
export VLLM_ATTNCAP_DIR=${VLLM_ATTNCAP_DIR:-$OUT/captures}
PY=${PY:-python3}
T1=${PHASE1_TIMEOUT_S:-300}  # the e2e step's cap; kernel tests get half
T2=${PHASE2_TIMEOUT_S:-270}
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

phase1() {
  local t0; t0=$(date +%s)
  step build 180 env ATTNCAP_BUILD_KERNELS=1 ATTNCAP_CUDA_ARCHS="${ATTNCAP_CUDA_ARCHS:-9.0}" \
    ATTNCAP_BUILD_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
  # the entry point lets spawned engine processes load the plugin (the kernels are already in place)
  step entry-point 90 env ATTNCAP_BUILD_KERNELS=0 "$PY" -m pip install -q -e . --no-deps --no-build-isolation
  step env 45 "$PY" -c "$ENV_PY"
  pytest_step kernel-tests $((T1 / 2)) -m gpu tests/gpu/test_decode_kernel.py tests/gpu/test_kernels.py
  pytest_step e2e "$T1" -s -m "gpu and not slow" -k "bfloat16 or full_graph or mrv2" tests/gpu/test_flash_backend_e2e.py
  step kernel-bench 60 "$PY" benchmarks/kernel_bench.py --decode --quick  # last: correctness first
  phase_summary phase1 "$t0"
}

phase2() {
  local t0; t0=$(date +%s)
  step bench "$T2" "$PY" benchmarks/capture_overhead.py --quick --models smollm2-135m --json "$OUT/capture_overhead.json"
  phase_summary phase2 "$t0"
}

compiled() {
  local t0; t0=$(date +%s)
  pytest_step compiled "$T1" -s -m "gpu and slow" tests/gpu/test_flash_backend_e2e.py
  phase_summary compiled "$t0"
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(phase1 phase2)
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
