#!/usr/bin/env bash
# Verification sets (lfw, cfp_fp, agedb_30, calfw, cplfw) with a checkpoint, on Ascend.
# Usage: bash scripts/run_eval.sh EVAL_PATH CKPT_PATH [DEVICE_ID] [more val.py options]
# Result lines: ./eval.log
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash $0 EVAL_PATH CKPT_PATH [DEVICE_ID] [more val.py options]" >&2
    exit 2
fi
. "$(dirname "$0")/env.sh"
EVAL_PATH=$1; CKPT_PATH=$2; shift 2
DEVICE_ID=0
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then DEVICE_ID=$1; shift; fi
"$PYTHON" "$ROOT/val.py" --eval_url "$EVAL_PATH" --ckpt_url "$CKPT_PATH" \
    --device_target "${DEVICE_TARGET:-Ascend}" --device_id "$DEVICE_ID" --log eval.log "$@"
