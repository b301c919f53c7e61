#!/usr/bin/env bash
# Standalone training on one GPU (fp16 backbone with dynamic loss scaling).
# Usage: bash scripts/run_standalone_train_gpu.sh DATA_PATH [DEVICE_ID] [more train.py options]
DEVICE_TARGET=GPU exec bash "$(dirname "$0")/run_standalone_train.sh" "$@"
