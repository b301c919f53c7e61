#!/usr/bin/env bash
# Standalone training on the CPU (fp32). Usage: bash scripts/run_standalone_train_cpu.sh DATA_PATH [more options]
DEVICE_TARGET=CPU exec bash "$(dirname "$0")/run_standalone_train.sh" "$@"
