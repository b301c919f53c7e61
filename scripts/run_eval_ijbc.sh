#!/usr/bin/env bash
# IJB-B or IJB-C 1:1 verification with a checkpoint (Ascend by default; DEVICE_TARGET=GPU|CPU to change).
# Usage: bash scripts/run_eval_ijbc.sh IJB_PATH CKPT_PATH [IJBB|IJBC] [DEVICE_ID]
# IJB_PATH is IJB_release/IJBB or IJB_release/IJBC; the target defaults to the folder's name.
# Result table: ./eval.log; scores and ROC plot: ./ijb_results/
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash $0 IJB_PATH CKPT_PATH [IJBB|IJBC] [DEVICE_ID]" >&2
    exit 2
fi
. "$(dirname "$0")/env.sh"
IJB_PATH=$1; CKPT_PATH=$2
TARGET=${3:-$(basename "$(realpath "$IJB_PATH")")}
TARGET=${TARGET^^}
if [[ "$TARGET" != "IJBB" && "$TARGET" != "IJBC" ]]; then
    if [ $# -ge 3 ]; then
        echo "usage: bash $0 IJB_PATH CKPT_PATH [IJBB|IJBC] [DEVICE_ID]  (target '$3' is neither IJBB nor IJBC)" >&2
        exit 2
    fi
    TARGET=IJBC   # a folder not named after its set
fi
"$PYTHON" "$ROOT/val.py" --eval_url "$IJB_PATH" --ckpt_url "$CKPT_PATH" --target "$TARGET" \
    --device_target "${DEVICE_TARGET:-Ascend}" --device_id "${4:-0}" --log eval.log --result_dir ijb_results
