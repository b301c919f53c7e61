#!/usr/bin/env bash
# Verification sets with an ONNX model on ONNX Runtime (GPU when onnxruntime-gpu is installed).
# Usage: bash scripts/run_eval_onnx.sh EVAL_PATH ONNX_PATH [GPU|CPU] [more eval_onnx.py options]
# Result lines: ./eval_onnx.log
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash $0 EVAL_PATH ONNX_PATH [GPU|CPU] [more eval_onnx.py options]" >&2
    exit 2
fi
. "$(dirname "$0")/env.sh"
EVAL_PATH=$1; ONNX_PATH=$2; shift 2
DEVICE=GPU
if [ $# -gt 0 ] && [[ "$1" == "GPU" || "$1" == "CPU" ]]; then DEVICE=$1; shift; fi
"$PYTHON" "$ROOT/eval_onnx.py" --eval_url "$EVAL_PATH" --onnx_url "$ONNX_PATH" \
    --device_target "$DEVICE" --log eval_onnx.log "$@"
