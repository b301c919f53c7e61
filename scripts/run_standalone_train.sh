#!/usr/bin/env bash
# Standalone training on one Ascend device.
# Usage: bash scripts/run_standalone_train.sh DATA_PATH [DEVICE_ID] [more train.py options]
# Output (checkpoints, train.log) in ./standalone_train/device<DEVICE_ID>/.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash $0 DATA_PATH [DEVICE_ID] [more train.py options]" >&2
    exit 2
fi
DEVICE_TARGET=${DEVICE_TARGET:-Ascend}
DATA_PATH=$(realpath "$1"); shift
DEVICE_ID=0
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then DEVICE_ID=$1; shift; fi
. "$(dirname "$0")/env.sh"
CONFIG=${CONFIG:-$ROOT/configs/ms1mv2_r100.yaml}
OUT=${OUT:-$PWD/standalone_train/device$DEVICE_ID}
mkdir -p "$OUT"
echo "training on $DEVICE_TARGET:$DEVICE_ID, output in $OUT"
"$PYTHON" "$ROOT/train.py" --config "$CONFIG" --data_url "$DATA_PATH" --train_url "$OUT" \
    --device_target "$DEVICE_TARGET" --device_id "$DEVICE_ID" "$@"
