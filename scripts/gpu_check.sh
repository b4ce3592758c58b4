#!/usr/bin/env bash
# The GPU session's one command, after the devkit install (shared/devkit/README.md):
# builds the capture kernels, installs the plugin's entry point, runs the GPU tests and
# the benchmarks, and tees everything into $OUT. Nothing here has run on a GPU yet
# (docs/gpu.md, "Status").
#
#   bash scripts/gpu_check.sh                 # = build e2e        (~5 min, fits one device call)
#   bash scripts/gpu_check.sh build kernels   # kernel tests + kernel_bench --quick
#   bash scripts/gpu_check.sh build compiled  # default compilation (cold torch.compile: minutes)
#   bash scripts/gpu_check.sh build bench     # capture_overhead.py, SmolLM2-135M shape
#   bash scripts/gpu_check.sh build bench-1b  # capture_overhead.py, 1B shape
#   bash scripts/gpu_check.sh all             # everything (longer than one 10-minute device call)
#
# A device call is limited to 10 minutes and a machine stays warm only ~30 s between calls,
# so chain the calls quickly or repeat `build` (idempotent: objects are reused) in each.
# Outputs: $OUT/gpu_check.log (everything), $OUT/gpu_check-summary.txt (rc and seconds per
# phase), $OUT/capture_overhead*.json. Env: PY (default python3), PHASE_TIMEOUT_S (per phase).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check-summary.txt
export PYTHONUNBUFFERED=1
if [ -f /tmp/kit/env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/kit/env.sh
else
  echo "[gpu_check] WARNING: /tmp/kit/env.sh not found: install the devkit first (shared/devkit/README.md)" | tee -a "$LOG"
fi
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}  # flashinfer is not in the kit
PY=${PY:-python3}
TO=${PHASE_TIMEOUT_S:-0}

run() {  # run NAME CMD... : log, time and record the exit status of one phase
  local name=$1; shift
  local t0 rc
  echo "=== [$name] $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  t0=$(date +%s)
  if [ "$TO" -gt 0 ]; then timeout "$TO" "$@" 2>&1 | tee -a "$LOG"; else "$@" 2>&1 | tee -a "$LOG"; fi
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY" "$LOG"
  return "$rc"
}

env_report() {
  "$PY" - <<'EOF'
import importlib.metadata as md, torch
print(f"python ok; torch {torch.__version__}, cuda {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
try:
    import vllm
    print(f"vllm {vllm.__version__}")
except Exception as e:
    print(f"vllm NOT importable: {e}")
from vllm_attncap.engine.compute import cuda
print(f"capture kernels available: {cuda.is_available()}")
eps = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
print(f"vllm.general_plugins entry points: {eps}")
EOF
}

phase_build() {
  run build-kernels env ATTNCAP_BUILD_KERNELS=1 "$PY" setup.py -q build_ext --inplace || return 1
  # The entry point lets vLLM's spawned processes load the plugin; the kernels are already in place.
  run install-entry-point env ATTNCAP_BUILD_KERNELS=0 "$PY" -m pip install -q -e . --no-deps --no-build-isolation \
    || echo "[gpu_check] editable install failed: tests and benchmarks fall back to in-process engines" | tee -a "$LOG"
  env_report 2>&1 | tee -a "$LOG"
}

phase_e2e()      { run e2e "$PY" -m pytest -q -s -p no:cacheprovider -m "not slow" tests/gpu/test_flash_backend_e2e.py; }
phase_compiled() { run compiled "$PY" -m pytest -q -s -p no:cacheprovider -m slow tests/gpu/test_flash_backend_e2e.py; }
phase_kernels() {
  run kernel-tests "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py tests/test_kernels_build.py
  run kernel-bench "$PY" benchmarks/kernel_bench.py --quick
}
phase_bench()    { run bench "$PY" benchmarks/capture_overhead.py --models smollm2-135m --json "$OUT/capture_overhead.json"; }
phase_bench_1b() { run bench-1b "$PY" benchmarks/capture_overhead.py --models llama-1b --json "$OUT/capture_overhead_1b.json"; }

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build e2e)
[ "${phases[0]}" = all ] && phases=(build e2e kernels compiled bench bench-1b)
status=0
for p in "${phases[@]}"; do
  case $p in
    build) phase_build || { status=1; echo "[gpu_check] build failed: stopping" | tee -a "$LOG"; break; } ;;
    e2e) phase_e2e || status=1 ;;
    compiled) phase_compiled || status=1 ;;
    kernels) phase_kernels || status=1 ;;
    bench) phase_bench || status=1 ;;
    bench-1b) phase_bench_1b || status=1 ;;
    *) echo "usage: $0 [build|e2e|kernels|compiled|bench|bench-1b|all]..." >&2; exit 2 ;;
  esac
done
echo "=== summary ($SUMMARY)"; cat "$SUMMARY"
exit $status
