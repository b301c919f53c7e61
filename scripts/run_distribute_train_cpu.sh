#!/usr/bin/env bash
# Data-parallel training with RANK_SIZE CPU worker processes (msrun; fp32).
# Usage: bash scripts/run_distribute_train_cpu.sh DATA_PATH RANK_SIZE [more train.py options]
# Logs and checkpoints: ./train_parallel/ (train.log, worker_<rank>.log).
if [ $# -lt 2 ]; then
    echo "usage: bash $0 DATA_PATH RANK_SIZE [more train.py options]" >&2
    exit 2
fi
DATA_PATH=$1; RANK_SIZE=$2; shift 2
DEVICE_TARGET=CPU exec bash "$(dirname "$0")/run_distribute_train.sh" "$RANK_SIZE" "$DATA_PATH" "$@"
