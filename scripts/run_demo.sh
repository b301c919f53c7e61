#!/usr/bin/env bash
# The bundled demo end to end on synthetic identities:
#   make the data (once) -> train a narrow iresnet18 -> verify on pairs of held-out identities.
# Usage: bash scripts/run_demo.sh        (PYTHON, DEMO_DATA, DEMO_OUT may be set)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DEMO_DATA:-demo_data}
OUT=${DEMO_OUT:-outputs/demo}
start=$SECONDS

if [ ! -f "$DATA/demo.bin" ] || [ ! -f "$DATA/train/train.rec" ]; then
    "$PYTHON" -m src.demo_data --output "$DATA"
fi
rm -rf "$OUT"   # the demo always trains from scratch
"$PYTHON" train.py --config configs/demo.yaml --data_url "$DATA/train" --train_url "$OUT"
"$PYTHON" val.py --eval_url "$DATA" --target demo --ckpt_url "$OUT" --log "$OUT/eval.log"

echo "[demo] held-out verification: $(grep -o 'Accuracy-Flip: [0-9.+-]*' "$OUT/eval.log" | tail -1)"
echo "[demo] total time: $((SECONDS - start)) s"
