#!/usr/bin/env bash
# Rebuild the bundled default model end to end with the dsvl2 pipeline:
#   synthetic data -> tokenizer + multi-turn records -> dsvl2 train (vision, align, warmup, pretrain, sft)
#   -> dsvl2 eval on held-out data -> dsvl2/assets/default_model/
# Usage: scripts/train_default_model.sh [--no-install]   (PYTHON=... to pick the interpreter)
# Everything is written under runs/default/ (git-ignored); stage timings go to runs/default/timings.txt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
RUN="$REPO/runs/default"
RECIPE="$REPO/recipes/default"
ASSETS="$REPO/dsvl2/assets/default_model"
INSTALL=1
[[ "${1:-}" == "--no-install" ]] && INSTALL=0

# Data sizes and seeds of the recipe (the stage YAML files read these folders).
TRAIN_SEED=1
EVAL_SEED=7
source "$RECIPE/data.env"

cd "$REPO"
mkdir -p "$RUN"
: > "$RUN/timings.txt"

timed() {  # timed NAME COMMAND...: run it and append its wall time to timings.txt
    local name="$1"; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@"
    echo "$name $((SECONDS - start))s" | tee -a "$RUN/timings.txt"
}

last_checkpoint() { ls -d "$1"/checkpoint-* | sort | tail -1; }

if [[ -d "$RUN/vision" || -d "$RUN/align" || -d "$RUN/warmup" || -d "$RUN/pretrain" || -d "$RUN/sft" ]]; then
    echo "error: $RUN already holds training runs; remove them (rm -rf $RUN) to retrain" >&2
    exit 1
fi

make_data() {  # the three datasets at once (image drawing is single-threaded)
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/data" --n "$N_TRAIN_MIX" --seed "$TRAIN_SEED" --split train &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/data_focus" --n "$N_TRAIN_FOCUS" --seed "$TRAIN_SEED" \
        --split train --tasks "$FOCUS_TASKS" &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/eval" --n "$N_EVAL" --seed "$EVAL_SEED" --split test &
    local failed=0
    for job in $(jobs -p); do wait "$job" || failed=1; done
    return "$failed"
}
timed data make_data
prepare() {  # prepare DIR [--tokenizer-out BASE]: multi-turn records and the grounding parts of them
    local dir="$1"; shift
    "$PYTHON" "$RECIPE/prepare.py" --data "$dir/train.jsonl" --train-out "$dir/train_mt.jsonl" \
        --grounding-out "$dir/train_st_grounding.jsonl" --one-object-out "$dir/train_mt_one_object.jsonl" "$@"
}
timed prepare prepare "$RUN/data" --tokenizer-out "$RUN/base"
prepare "$RUN/data_focus"

for stage in vision align warmup pretrain sft; do
    timed "$stage" "$PYTHON" -m dsvl2.train.trainer "$RECIPE/$stage.yaml"
done

FINAL="$(last_checkpoint "$RUN/sft")"
timed eval "$PYTHON" -m dsvl2.eval.runner --model "$FINAL" --data "$RUN/eval/test.jsonl" --out "$RUN/eval.json" \
    --no-progress
echo "total $(awk '{sum += $2} END {print sum}' "$RUN/timings.txt")s" | tee -a "$RUN/timings.txt"

if [[ "$INSTALL" == 1 ]]; then
    rm -rf "$ASSETS"
    mkdir -p "$ASSETS"
    for file in config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json \
                processor_config.json; do
        cp "$FINAL/$file" "$ASSETS/$file"
    done
    cp "$RUN/eval.json" "$ASSETS/eval_report.json"
    echo "installed $FINAL into $ASSETS"
fi
