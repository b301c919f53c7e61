#!/usr/bin/env bash
# Data-parallel training on RANK_SIZE devices of this machine with MindSpore's msrun (Ascend by default).
# Usage: bash scripts/run_distribute_train.sh RANK_SIZE DATA_PATH [more train.py options]
# Env:   DEVICE_TARGET=Ascend|GPU|CPU  CONFIG=configs/....yaml  OUT=train_parallel  MASTER_PORT=8118
#        RANK_TABLE_FILE=/path/hccl.json  (optional, Ascend: passed to msrun; any device count)
#        LAUNCHER=mpirun                  (optional, GPU: OpenMPI instead of msrun)
# Logs:  $OUT/train.log (rank 0's log lines) and $OUT/worker_<rank>.log (every rank's output);
#        checkpoints in $OUT (rank 0 writes them).
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: bash $0 RANK_SIZE DATA_PATH [more train.py options]" >&2
    exit 2
fi
RANK_SIZE=$1
DATA_PATH=$(realpath "$2")
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
DEVICE_TARGET=${DEVICE_TARGET:-Ascend}
CONFIG=${CONFIG:-$ROOT/configs/ms1mv2_r100.yaml}
OUT=$(realpath -m "${OUT:-$PWD/train_parallel}")
LAUNCHER=${LAUNCHER:-msrun}
mkdir -p "$OUT"
ARGS=(--config "$CONFIG" --data_url "$DATA_PATH" --train_url "$OUT" --device_target "$DEVICE_TARGET"
      --device_num "$RANK_SIZE" "$@")
echo "$LAUNCHER: $RANK_SIZE x $DEVICE_TARGET, output and logs in $OUT"
if [ "$LAUNCHER" = "mpirun" ]; then
    mpirun -n "$RANK_SIZE" --allow-run-as-root --output-filename "$OUT/mpirun_log" --merge-stderr-to-stdout \
        "$PYTHON" "$ROOT/train.py" "${ARGS[@]}"
else
    # msrun starts the workers with the `python` on PATH: make it $PYTHON's environment.
    PYTHON_BIN=$(dirname "$(command -v "$PYTHON")")
    export PATH="$PYTHON_BIN:$PATH"
    MSRUN=${MSRUN:-$PYTHON_BIN/msrun}
    [ -x "$MSRUN" ] || MSRUN=msrun
    EXTRA=()
    if [ -n "${RANK_TABLE_FILE:-}" ]; then EXTRA+=(--rank_table_file "$(realpath "$RANK_TABLE_FILE")"); fi
    "$MSRUN" --worker_num="$RANK_SIZE" --local_worker_num="$RANK_SIZE" --master_addr=127.0.0.1 \
        --master_port="${MASTER_PORT:-8118}" --log_dir="$OUT" --join=True --cluster_time_out=300 "${EXTRA[@]}" \
        "$ROOT/train.py" "${ARGS[@]}"
fi
