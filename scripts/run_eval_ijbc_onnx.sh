#!/usr/bin/env bash
# IJB-B or IJB-C 1:1 verification with an ONNX model on ONNX Runtime.
# Usage: bash scripts/run_eval_ijbc_onnx.sh IJB_PATH ONNX_PATH [ONNX_RS_PATH] IJBB|IJBC [GPU|CPU]
# One ONNX file with a dynamic batch serves every batch; a second "remainder" model (the model
# zoo's ONNX_RS_PATH) is accepted for compatibility and not needed.
# Result table: ./eval_onnx_<TARGET>.log; scores and ROC plot: ./ijb_results/
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash $0 IJB_PATH ONNX_PATH [ONNX_RS_PATH] IJBB|IJBC [GPU|CPU]" >&2
    exit 2
fi
. "$(dirname "$0")/env.sh"
IJB_PATH=$1; ONNX_PATH=$2; shift 2
if [[ "${1^^}" != "IJBB" && "${1^^}" != "IJBC" ]]; then shift; fi   # the optional remainder model
TARGET=${1:-}; TARGET=${TARGET^^}; DEVICE=${2:-GPU}
if [[ "$TARGET" != "IJBB" && "$TARGET" != "IJBC" ]]; then
    echo "usage: bash $0 IJB_PATH ONNX_PATH [ONNX_RS_PATH] IJBB|IJBC [GPU|CPU]" >&2
    exit 2
fi
"$PYTHON" "$ROOT/eval_ijbc_onnx.py" --image-path "$IJB_PATH" --onnx_url "$ONNX_PATH" --target "$TARGET" \
    --device_target "$DEVICE" --result-dir ijb_results --log "eval_onnx_$TARGET.log"
