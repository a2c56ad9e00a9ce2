#!/usr/bin/env bash
# The prepared GPU check, for a GPU image as it is: its own python3 and torch, no venv, no registry.
#   bash bench/gpu_check.sh                      # on the GPU machine (docs/offline.md); PY=... picks the python
#   bash bench/gpu_check.sh --rehearse           # on a CPU machine with a registry: the same steps, tiny, in a
#                                                # cached Python 3.12 venv with the image's versions
#   bash bench/gpu_check.sh --rehearse --imports # only the rehearsal's venv, the bundle and step 1
# OUT=DIR keeps the files (status.txt, steps.jsonl, imports.json, preflight.json, bench.json, table.txt, each
# step's output); without it they go to a temporary folder, named at the end.
# 0. the wheels in .whl/ (bench/offline_wheels.sh: what the image lacks), when present, are installed the one
#    way an offline image allows: pip install --no-index --no-deps --target /tmp/site, and PYTHONPATH=/tmp/site;
# 1. imports: bench/import_check.py (every entrep module, each requirement and optional piece with its version
#    and origin, the torch/peft/accelerate/open_clip APIs the kit calls): a missing package fails here by name;
# 2. preflight of configs/entrep_vitb16.yaml with random weights (rehearsal: configs/demo.yaml, --steps 1);
# 3. one fold of one epoch of ViT-B/16 in bf16 on the demo data under the real `accelerate launch`
#    (python3 -m accelerate.commands.launch: no venv bin/; rehearsal: the tiny model, fp32);
# 4. bench/throughput.py --quick (ViT-B/16 rows with TFLOP/s and MFU; rehearsal: --smoke, the tiny model on CPU).
# Ends with one table naming the card, and exit 1 when a step failed (a bench row that failed counts).
# Each step runs under its own `timeout`, clipped so that the whole stays within CHECK_BUDGET_S (default
# 450 s: under 8 minutes on one H100/H200, the rehearsal's venv build not counted).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu IMPORTS_ONLY=0
for arg in "$@"; do
    case $arg in
        --rehearse) MODE=rehearse ;;
        --imports) IMPORTS_ONLY=1 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/status.txt" "$OUT/steps.jsonl"
export COLUMNS=160 PYTHONUNBUFFERED=1

if [[ $MODE == rehearse ]]; then
    t0=$SECONDS
    PY=$(python3 bench/rehearsal_env.py | tail -n 1)
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || { echo "gpu_check: the rehearsal's Python could not be had (exit $rc)" >&2; exit "$rc"; }
    echo "rehearsal: venv ready in $((SECONDS - t0)) s: $PY"
    SITE=${SITE:-$OUT/site}
    # the image's sizes, shrunk to the tiny model on 2 CPU cores
    LIM_INSTALL=60 LIM_IMPORTS=120 LIM_PREFLIGHT=180 LIM_DEMO=60 LIM_FOLD=300 LIM_BENCH=400
    BUDGET=${CHECK_BUDGET_S:-1200}
    PREFLIGHT=(--config configs/demo.yaml --steps 1 train.batch_size=8)
    DEMO=(--cases 60 --test-cases 14 --size 64)
    FOLD=(--config configs/demo.yaml train.mixed_precision=no train.batch_size=16 --name gpu_check)
    LAUNCH_MP=no FOLD_LABEL="entrep-tiny fp32 on CPU, 1 fold x 1 epoch"
    BENCH=(--device cpu --smoke --skip compile hnsw-1m "augment on device")
else
    PY=${PY:-python3}
    SITE=${SITE:-/tmp/site}
    LIM_INSTALL=30 LIM_IMPORTS=60 LIM_PREFLIGHT=100 LIM_DEMO=30 LIM_FOLD=130 LIM_BENCH=170
    BUDGET=${CHECK_BUDGET_S:-450}
    PREFLIGHT=(--config configs/entrep_vitb16.yaml)
    DEMO=()
    FOLD=(--config configs/entrep_vitb16.yaml train.mixed_precision=bf16 --name gpu_check)
    LAUNCH_MP=bf16 FOLD_LABEL="ViT-B/16 bf16, 1 fold x 1 epoch"
    BENCH=(--device cuda --quick --skip compile hnsw-1m --images 256)
fi
DEADLINE=$((SECONDS + BUDGET))
RESERVE=15  # for the table at the end
FAILED=0

# step NAME LIMIT_S COMMAND...: under `timeout`, clipped to the time left; output to the console and OUT/NAME.txt
step() {
    local name=$1 want=$2 left lim t0 rc
    shift 2
    left=$((DEADLINE - SECONDS - RESERVE))
    lim=$(( want < left ? want : left ))
    if (( lim < 5 )); then
        echo "== $name: skipped, no time left" | tee -a "$OUT/status.txt"
        echo "{\"step\": \"$name\", \"exit\": null, \"seconds\": 0, \"limit_s\": 0}" >> "$OUT/steps.jsonl"
        FAILED=1
        return 1
    fi
    t0=$SECONDS
    timeout -k 10 "$lim" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s (limit $lim s)$( ((rc == 124)) && echo ', timed out')" \
        | tee -a "$OUT/status.txt"
    echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $lim}" >> "$OUT/steps.jsonl"
    (( rc == 0 )) || FAILED=1
    return "$rc"
}

if [[ $MODE == gpu ]]; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1 \
        || echo "no nvidia-smi" > "$OUT/card.txt"
else
    echo "CPU rehearsal of the offline image, $(nproc) cores" > "$OUT/card.txt"
fi
echo "card: $(cat "$OUT/card.txt")"

shopt -s nullglob
WHEELS=(.whl/*.whl)
if (( ${#WHEELS[@]} )); then
    rm -rf "$SITE"
    step install "$LIM_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "carried wheels: ${WHEELS[*]##*/} -> PYTHONPATH=$PYTHONPATH"
else
    echo "no .whl/: every package must be on the image (bash bench/offline_wheels.sh makes the bundle)"
fi

step imports "$LIM_IMPORTS" "$PY" bench/import_check.py --json "$OUT/imports.json"
if (( IMPORTS_ONLY )); then
    echo "import check only: $( ((FAILED)) && echo failed || echo ok); files in $OUT"
    exit "$FAILED"
fi
if (( FAILED )); then
    echo "== the rest: skipped, they would fail on the same import or install" | tee -a "$OUT/status.txt"
else
    step preflight "$LIM_PREFLIGHT" "$PY" -m entrep.preflight "${PREFLIGHT[@]}" model.pretrained= \
        output_dir="$OUT/runs" --json "$OUT/preflight.json"

    step demo "$LIM_DEMO" "$PY" -m entrep.demo "$OUT/demo_data" "${DEMO[@]}"
    start=$SECONDS
    step fold "$LIM_FOLD" "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
        --mixed_precision "$LAUNCH_MP" --dynamo_backend no train.py "${FOLD[@]}" --data "$OUT/demo_data" \
        output_dir="$OUT/runs" model.pretrained= train.epochs=1 cv.n_splits=3 'train.folds=[0]'
    echo "$((SECONDS - start))" > "$OUT/fold_wall_s.txt"

    step bench "$LIM_BENCH" "$PY" bench/throughput.py "${BENCH[@]}" --json "$OUT/bench.json"
fi

timeout 30 "$PY" bench/gpu_summary.py "$OUT" "$FOLD_LABEL" | tee "$OUT/table.txt"
(( PIPESTATUS[0] == 0 )) || FAILED=1
echo "files in $OUT"
exit "$FAILED"
