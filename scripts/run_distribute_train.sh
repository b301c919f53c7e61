#!/usr/bin/env bash
# Data-parallel training with MindSpore's msrun (Ascend by default), on one node or several.
# Usage: bash scripts/run_distribute_train.sh RANK_SIZE DATA_PATH [more train.py options]
#   RANK_SIZE      devices (worker processes) of THIS node
# Env:   DEVICE_TARGET=Ascend|GPU|CPU  CONFIG=configs/....yaml  OUT=train_parallel
#        NODES=1                nodes of the job (total workers = NODES x RANK_SIZE)
#        NODE_RANK=0            this node's index, 0 .. NODES-1 (node 0 runs msrun's scheduler)
#        MASTER_ADDR=127.0.0.1  address of node 0, reachable from every node
#        MASTER_PORT=8118       a free port on node 0
#        CLUSTER_TIME_OUT=300   seconds the nodes wait for each other (also bounds a hang after a
#                               node dies: the others stop, and --resume auto continues)
#        RANK_TABLE_FILE=/path/hccl.json  (optional, Ascend: passed to msrun)
#        LAUNCHER=mpirun                  (optional, GPU, one node: OpenMPI instead of msrun)
# Run the same command on every node with its NODE_RANK. Logs: $OUT/train.log (global rank 0's
# log lines) and $OUT/worker_<rank>.log (every local worker's output); rank 0 writes the
# checkpoints, every rank its head shard.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
    echo "usage: bash $0 RANK_SIZE DATA_PATH [more train.py options]" >&2
    exit 2
fi
RANK_SIZE=$1
DATA_PATH=$(realpath "$2")
shift 2
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
if ! [[ "$NODES" =~ ^[0-9]+$ ]] || [ "$NODES" -lt 1 ] || ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NODES" ]; then
    echo "error: NODES must be a positive integer and NODE_RANK one of 0 .. NODES-1 (NODES=$NODES, NODE_RANK=$NODE_RANK)" >&2
    exit 2
fi
WORLD=$((NODES * RANK_SIZE))
. "$(dirname "$0")/env.sh"
DEVICE_TARGET=${DEVICE_TARGET:-Ascend}
CONFIG=${CONFIG:-$ROOT/configs/ms1mv2_r100.yaml}
OUT=$(realpath -m "${OUT:-$PWD/train_parallel}")
LAUNCHER=${LAUNCHER:-msrun}
mkdir -p "$OUT"
ARGS=(--config "$CONFIG" --data_url "$DATA_PATH" --train_url "$OUT" --device_target "$DEVICE_TARGET"
      --device_num "$WORLD" "$@")
echo "$LAUNCHER: node $NODE_RANK of $NODES, $RANK_SIZE x $DEVICE_TARGET here, $WORLD workers in all; output and logs in $OUT"
if [ "$LAUNCHER" = "mpirun" ]; then
    if [ "$NODES" -gt 1 ]; then
        echo "error: LAUNCHER=mpirun starts one node; use msrun (the default) for several nodes" >&2
        exit 2
    fi
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
    "$MSRUN" --worker_num="$WORLD" --local_worker_num="$RANK_SIZE" --node_rank="$NODE_RANK" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" --log_dir="$OUT" \
        --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-300}" "${EXTRA[@]}" \
        "$ROOT/train.py" "${ARGS[@]}"
fi
