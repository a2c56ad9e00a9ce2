#!/usr/bin/env bash
# The prepared GPU check: one short script for a lent or rented GPU (under 8 minutes on one card).
#   bash bench/gpu_check.sh            # PY=/path/to/python to pick the interpreter; OUT=DIR keeps the files
# 1. preflight of configs/entrep_vitb16.yaml with random weights (no network needed);
# 2. bench/throughput.py --device cuda --quick (ViT-B/16 rows with TFLOP/s and MFU);
# 3. one fold of one epoch of ViT-B/16 in bf16 on the demo data, under the real `accelerate launch`.
# Ends with one table naming the card. Each step has its own time limit, so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export COLUMNS=160 PYTHONUNBUFFERED=1
status() { echo "== $1: exit $2" | tee -a "$OUT/status.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

timeout 150 "$PY" -m entrep.preflight --config configs/entrep_vitb16.yaml model.pretrained= \
    output_dir="$OUT/runs" --json "$OUT/preflight.json" 2>&1 | tee "$OUT/preflight.txt"
status preflight "${PIPESTATUS[0]}"

timeout 200 "$PY" bench/throughput.py --device cuda --quick --skip compile hnsw-1m --images 256 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
status bench "${PIPESTATUS[0]}"

"$PY" -m entrep.demo "$OUT/demo_data" >/dev/null
start=$(date +%s)
timeout 150 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no train.py --config configs/entrep_vitb16.yaml --data "$OUT/demo_data" --name gpu_check \
    output_dir="$OUT/runs" model.pretrained= train.mixed_precision=bf16 train.epochs=1 cv.n_splits=3 \
    'train.folds=[0]' 2>&1 | tail -n 20 | tee "$OUT/fold.txt"
status fold "${PIPESTATUS[0]}"
echo "$(( $(date +%s) - start ))" > "$OUT/fold_wall_s.txt"

"$PY" bench/gpu_summary.py "$OUT"
