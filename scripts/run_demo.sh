#!/usr/bin/env bash
# The bundled demo end to end on synthetic identities:
#   make the data (once) -> train a narrow iresnet18 with ArcFace -> verify on pairs of held-out
#   identities with val.py -> export MINDIR and ONNX -> verify again with ONNX Runtime.
# Usage: bash scripts/run_demo.sh [TRAIN_OPTIONS]   (PYTHON, DEMO_DATA, DEMO_OUT may be set)
#   e.g. DEMO_OUT=outputs/demo_adaface bash scripts/run_demo.sh --margin_type adaface
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
DATA=${DEMO_DATA:-demo_data}
OUT=${DEMO_OUT:-outputs/demo}
start=$SECONDS
stage() { echo; echo "==== [demo] $1 ($((SECONDS - start)) s)"; }

# The demo always trains from scratch, but deletes only a folder it made itself.
if [ -e "$OUT" ] && [ ! -f "$OUT/.arcface-demo" ]; then
    echo "error: $OUT exists and was not made by the demo: set DEMO_OUT to another folder" >&2
    exit 2
fi

if [ ! -f "$DATA/demo.bin" ] || [ ! -f "$DATA/train/train.rec" ]; then
    stage "generating synthetic identities"
    "$PYTHON" -m src.data.demo_data --output "$DATA"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.arcface-demo"
stage "training"
"$PYTHON" train.py --config configs/demo.yaml --data_url "$DATA/train" --train_url "$OUT" "$@"
stage "evaluating the checkpoint on held-out identities"
"$PYTHON" val.py --eval_url "$DATA" --target demo --ckpt_url "$OUT" --log "$OUT/eval.log"
stage "exporting"
"$PYTHON" export.py --ckpt_file "$OUT" --file_name "$OUT/arcface_demo" --file_format MINDIR
"$PYTHON" export.py --ckpt_file "$OUT" --file_name "$OUT/arcface_demo" --file_format ONNX
stage "evaluating the ONNX model with ONNX Runtime"
"$PYTHON" eval_onnx.py --eval_url "$DATA" --target demo --onnx_url "$OUT/arcface_demo.onnx" --log "$OUT/eval_onnx.log"

echo
echo "[demo] held-out verification, checkpoint: $(grep -o 'Accuracy-Flip: [0-9.+-]*' "$OUT/eval.log" | tail -1)"
echo "[demo] held-out verification, ONNX:       $(grep -o 'Accuracy-Flip: [0-9.+-]*' "$OUT/eval_onnx.log" | tail -1)"
echo "[demo] outputs in $OUT: checkpoints, train.log, training_curve.png, arcface_demo.mindir/.onnx"
echo "[demo] total time: $((SECONDS - start)) s"
