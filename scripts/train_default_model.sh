#!/usr/bin/env bash
# Rebuild the bundled default model end to end with the dsvl2 pipeline:
#   synthetic data -> tokenizer + multi-turn records -> dsvl2 train (vision, align, warmup, pretrain, sft)
#   -> dsvl2 eval on held-out data (one-turn seeds 23 and 7; two-turn conversations of seed 23 and their last
#      questions asked first) -> dsvl2/assets/default_model/ (with the seed-23 report: no recipe choice was made on it)
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
CHAT_SEED=2
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

make_data() {  # the datasets at once (image drawing is single-threaded)
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/data" --n "$N_TRAIN_MIX" --seed "$TRAIN_SEED" --split train &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/data_focus" --n "$N_TRAIN_FOCUS" --seed "$TRAIN_SEED" \
        --split train --tasks "$FOCUS_TASKS" &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/data_chat" --n "$N_TRAIN_CHAT" --seed "$CHAT_SEED" \
        --split train --tasks "$CHAT_TASKS" --turns "$CHAT_TURNS" &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/eval" --n "$N_EVAL" --seed "$EVAL_SEED" --split test &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/report" --n "$N_EVAL" --seed "$REPORT_SEED" --split test &
    "$PYTHON" -m dsvl2.train.synthetic --out "$RUN/two_turn" --n "$N_EVAL" --seed "$REPORT_SEED" --split test \
        --tasks "$TWO_TURN_TASKS" --turns 2 --follow-ups "$TWO_TURN_FOLLOW_UPS" &
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
evaluate() {  # the reported set, the set the recipe was chosen on, and the two-turn set with its first-turn twin
    local data
    for data in report/test eval/test two_turn/test two_turn/test_asked_first; do
        "$PYTHON" -m dsvl2.eval.runner --model "$FINAL" --data "$RUN/$data.jsonl" \
            --out "$RUN/eval_${data//\//_}.json" --no-progress
    done
}
timed eval evaluate
echo "total $(awk '{sum += $2} END {print sum}' "$RUN/timings.txt")s" | tee -a "$RUN/timings.txt"

if [[ "$INSTALL" == 1 ]]; then
    rm -rf "$ASSETS"
    mkdir -p "$ASSETS"
    for file in config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json \
                processor_config.json; do
        cp "$FINAL/$file" "$ASSETS/$file"
    done
    cp "$RUN/eval_report_test.json" "$ASSETS/eval_report.json"
    echo "installed $FINAL into $ASSETS"
fi
