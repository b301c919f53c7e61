#!/usr/bin/env bash
# Offline inference with the C++ app: preprocess -> build -> infer -> postprocess.
# Usage: bash scripts/run_310_infer.sh MINDIR_PATH DATASET_PATH NEED_PREPROCESS DEVICE_TARGET [DEVICE_ID]
#   DATASET_PATH     one verification .bin (e.g. /data/eval/lfw.bin)
#   NEED_PREPROCESS  y: write the batches first; n: reuse ./preprocess_Result
#   DEVICE_TARGET    Ascend, GPU or CPU
# Results: ./result_Files, ./time_Result/test_perform_static.txt, accuracy in ./acc.log.
# The app is built with ascend310_infer/build.sh (MINDSPORE_PATH / LITE_HOME select the install).
set -euo pipefail
if [ $# -lt 4 ] || [[ "$3" != "y" && "$3" != "n" ]]; then
    echo "usage: bash $0 MINDIR_PATH DATASET_PATH NEED_PREPROCESS(y|n) DEVICE_TARGET(Ascend|GPU|CPU) [DEVICE_ID]" >&2
    exit 2
fi
. "$(dirname "$0")/env.sh"
MINDIR=$(realpath "$1"); DATASET=$(realpath "$2"); NEED_PREPROCESS=$3; DEVICE_TARGET=$4; DEVICE_ID=${5:-0}
NAME=$(basename "$DATASET" .bin)
BATCH_SIZE=${BATCH_SIZE:-64}

if [ "$NEED_PREPROCESS" = "y" ]; then
    rm -rf preprocess_Result preprocess_Label
    "$PYTHON" "$ROOT/preprocess.py" --dataset_path "$DATASET" --result_dir preprocess_Result \
        --label_dir preprocess_Label --batch_size "$BATCH_SIZE"
fi
if [ ! -x "$ROOT/ascend310_infer/out/main" ]; then
    bash "$ROOT/ascend310_infer/build.sh"
fi
rm -rf result_Files time_Result
"$ROOT/ascend310_infer/out/main" --mindir_path="$MINDIR" --input0_path=preprocess_Result \
    --device_type="$DEVICE_TARGET" --device_id="$DEVICE_ID" --output_dir=result_Files --time_dir=time_Result
"$PYTHON" "$ROOT/postprocess.py" --result_dir result_Files --label_dir preprocess_Label --data_set "$NAME" | tee acc.log
cat time_Result/test_perform_static.txt
