# Sourced by the recipes: their shared settings, the CLI wrapper and the writer of $OUT/results.csv rows
# (row,eer_percent,min_dcf,train_seconds,checkpoints; a re-run replaces its row). Settings come from the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data}"
OUT="${OUT:-$HOME/.deep-speaker-wd/librispeech-100}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-12}"
TRIPLET_EPOCHS="${TRIPLET_EPOCHS:-4}"
STEPS="${STEPS:-50}"
TRIALS="$DATA/trials/librispeech-test-other.txt"
TEST_ROOT="$DATA/LibriSpeech/test-other"
CHANNELS_TRIALS="$DATA/trials/librispeech-test-other-channels.txt"  # its audio root: $DATA
ASNORM_TOP="${ASNORM_TOP:-100}"
PY="${PY:-$ROOT/.venv/bin/python}"

declare -A NAMES=([rescnn]=ResCNN [tdnn]=TDNN [gru]=GRU [ecapa]=ECAPA)  # the checkpoint name of each --model

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }

seconds() {  # the training wall time in a <Model>_state.json
  "$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1])).get("seconds", 0)))' "$1"
}

shared_dir() {  # dir base: a working dir that shares the feature cache and model inputs of base
  mkdir -p "$1"
  for shared in audio-fbanks keras-inputs; do ln -sfn "$2/$shared" "$1/$shared"; done
}

# row prefix (e.g. .../checkpoints-softmax/TDNN): evaluates <prefix>_best.keras, with the training seconds of
# <prefix>_state.json
evaluate_trained() {
  evaluate "$1" "$(seconds "$2_state.json")" "$2_best.keras"
}

evaluate() {  # row seconds checkpoint [checkpoint ...]: eval-trials (fused if several), scores and DET in $OUT/row.*
  # EVAL_OPTIONS: more eval-trials options, e.g. "--score_norm asnorm --cohort_dir DIR" (split on spaces).
  local row="$1" trained="$2" line args=()
  shift 2
  for checkpoint in "$@"; do args+=(--checkpoint_file "$checkpoint"); done
  # shellcheck disable=SC2206  # a list of options
  args+=(${EVAL_OPTIONS:-})
  mkdir -p "$(dirname "$OUT/$row")"
  line="$(cli eval-trials --trials "$TRIALS" --audio_root "$TEST_ROOT" "${args[@]}" \
          --scores_file "$OUT/$row.scores.csv" --det_plot "$OUT/$row.det.png" | grep 'EER = ' | tail -1)"
  echo "$row: $line (trained $trained s)" >&2
  (  # under a lock: recipes running side by side on one $OUT share its results.csv
    flock 9
    touch "$OUT/results.csv"
    grep -v "^$row," "$OUT/results.csv" > "$OUT/results.csv.tmp" || true
    mv "$OUT/results.csv.tmp" "$OUT/results.csv"
    echo "$row,$(echo "$line" | sed -E 's/EER = ([0-9.]+) %, minDCF\(p_target=0.01\) = ([0-9.]+)/\1,\2/'),$trained,$*" \
      >> "$OUT/results.csv"
  ) 9> "$OUT/results.csv.lock"
}

both_lists() {  # row seconds checkpoint...: evaluate on test-other and on test-other-channels ({list} in row)
  local row="$1"
  shift
  evaluate "${row/\{list\}/test-other}" "$@"
  TRIALS="$CHANNELS_TRIALS" TEST_ROOT="$DATA" evaluate "${row/\{list\}/channels}" "$@"
}

normed() {  # norm row seconds checkpoint...: both_lists with eval-trials --score_norm norm (none, mean or asnorm),
  # against the training speakers of $OUT/clean
  local norm="$1"
  shift
  if [ "$norm" = none ]; then both_lists "$@"
  else EVAL_OPTIONS="--score_norm $norm --cohort_dir $OUT/clean --asnorm_top $ASNORM_TOP" both_lists "$@"; fi
}

scored() {  # norm row seed seconds checkpoint...: normed, as accuracy/<row>[+<norm>]/{list}/seed<seed> (no +none);
  # a normalised row has no training seconds
  local norm="$1" row="$2" seed="$3" seconds="$4"
  shift 4
  [ "$norm" = none ] || row="$row+$norm" seconds=-
  normed "$norm" "accuracy/$row/{list}/seed$seed" "$seconds" "$@"
}
