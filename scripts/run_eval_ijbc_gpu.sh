#!/usr/bin/env bash
# IJB-B or IJB-C 1:1 verification with a checkpoint on a GPU.
# Usage: bash scripts/run_eval_ijbc_gpu.sh IJB_PATH CKPT_PATH [IJBB|IJBC] [DEVICE_ID]
# IJB_PATH is IJB_release/IJBB or IJB_release/IJBC; the target defaults to the folder's name.
# Result table: ./eval.log; scores and ROC plot: ./ijb_results/
DEVICE_TARGET=GPU exec bash "$(dirname "$0")/run_eval_ijbc.sh" "$@"
