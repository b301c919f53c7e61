#!/usr/bin/env bash
# Verification sets with a checkpoint, on a GPU. Usage: bash scripts/run_eval_gpu.sh EVAL_PATH CKPT_PATH [DEVICE_ID]
DEVICE_TARGET=GPU exec bash "$(dirname "$0")/run_eval.sh" "$@"
