#!/usr/bin/env bash
# Data-parallel training on RANK_SIZE GPUs of this machine (msrun; LAUNCHER=mpirun or --launcher mpirun for OpenMPI).
# Usage: bash scripts/run_distribute_train_gpu.sh DATA_PATH RANK_SIZE [--launcher mpirun] [more train.py options]
# Logs and checkpoints: ./train_parallel/ (train.log, worker_<rank>.log).
if [ $# -lt 2 ]; then
    echo "usage: bash $0 DATA_PATH RANK_SIZE [--launcher msrun|mpirun] [more train.py options]" >&2
    exit 2
fi
DATA_PATH=$1; RANK_SIZE=$2; shift 2
if [ "${1:-}" = "--launcher" ]; then export LAUNCHER=$2; shift 2; fi
DEVICE_TARGET=GPU exec bash "$(dirname "$0")/run_distribute_train.sh" "$RANK_SIZE" "$DATA_PATH" "$@"
