#!/usr/bin/env bash
# The README's mining table: train on LibriSpeech train-clean-100 (251 speakers), evaluate on the unseen
# speakers of the test-other trial list. One softmax phase, then random, hard and semihard triplets from its best
# checkpoint, each in its own working dir sharing the cache, inputs and softmax checkpoints; and, for the same
# budget as softmax + triplets, the softmax phase continued for as many epochs as the triplet phase.
#   bash recipes/librispeech_100.sh [clean|augmented]
# Rows go to $OUT/results.csv: config,eer_percent,min_dcf,train_seconds (of the phase, from <Model>_state.json),
# checkpoint (a re-run replaces its rows;
# finished stages do nothing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VARIANT="${1:-clean}"
DATA="${DATA:-$ROOT/../shared/data}"
OUT="${OUT:-$HOME/.deep-speaker-wd/librispeech-100}"
WIDTH="${WIDTH:-0.25}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-12}"
TRIPLET_EPOCHS="${TRIPLET_EPOCHS:-4}"
STEPS="${STEPS:-50}"
MINING_MODES="${MINING_MODES:-random hard semihard}"
SOFTMAX_LONG="${SOFTMAX_LONG:-1}"  # 0 skips the softmax-only run of the same budget
TRIALS="$DATA/trials/librispeech-test-other.txt"
TEST_ROOT="$DATA/LibriSpeech/test-other"
PY="$ROOT/.venv/bin/python"
BASE="$OUT/$VARIANT"
case "$VARIANT" in
  clean) AUGMENT=() ;;
  augmented) AUGMENT=(--speed_perturb --noise white,pink --snr_range 5,20) ;;
  *) echo "Unknown variant: $VARIANT (clean or augmented)" >&2; exit 2 ;;
esac
mkdir -p "$BASE"

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }

seconds() {  # training wall time recorded next to a checkpoint
  "$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1])).get("seconds", 0)))' "$1"
}

evaluate() {  # name checkpoint
  local line
  line="$(cli eval-trials --trials "$TRIALS" --audio_root "$TEST_ROOT" --checkpoint_file "$2" \
          --scores_file "$BASE/$1.scores.csv" --det_plot "$BASE/$1.det.png" | tail -1)"
  local trained
  trained="$(seconds "$(dirname "$2")/ResCNN_state.json")"
  echo "$1: $line (trained $trained s)" >&2
  touch "$OUT/results.csv"
  grep -v "^$VARIANT/$1," "$OUT/results.csv" > "$OUT/results.csv.tmp" || true
  mv "$OUT/results.csv.tmp" "$OUT/results.csv"
  echo "$VARIANT/$1,$(echo "$line" | sed -E 's/EER = ([0-9.]+) %, minDCF\(p_target=0.01\) = ([0-9.]+)/\1,\2/'),$trained,$2" \
    >> "$OUT/results.csv"
}

cli build-mfcc-cache --working_dir "$BASE" --audio_dir "$DATA/LibriSpeech/train-clean-100" "${AUGMENT[@]}"
cli build-keras-inputs --working_dir "$BASE" --counts_per_speaker 100,10

shared_dir() {  # a working dir that shares the cache and model inputs of $BASE
  mkdir -p "$1"
  for shared in audio-fbanks keras-inputs; do ln -sfn "$BASE/$shared" "$1/$shared"; done
}

cli train-model --working_dir "$BASE" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" --steps_per_epoch "$STEPS" \
    --width "$WIDTH"
evaluate softmax "$BASE/checkpoints-softmax/ResCNN_best.keras"

for mining in $MINING_MODES; do
  wd="$BASE/triplet-$mining"
  shared_dir "$wd"
  ln -sfn "$BASE/checkpoints-softmax" "$wd/checkpoints-softmax"
  cli train-model --working_dir "$wd" --no_pre_training_phase --triplet_mining "$mining" --epochs "$TRIPLET_EPOCHS" \
      --steps_per_epoch "$STEPS" --width "$WIDTH" --history_size 2000 --refresh_every 25
  evaluate "triplet-$mining" "$wd/checkpoints-triplets/ResCNN_best.keras"
done

[ "$SOFTMAX_LONG" = 1 ] || exit 0
wd="$BASE/softmax-long"
shared_dir "$wd"
[ -d "$wd/checkpoints-softmax" ] || cp -r "$BASE/checkpoints-softmax" "$wd/checkpoints-softmax"
cli train-model --working_dir "$wd" --pre_training_phase --epochs $((SOFTMAX_EPOCHS + TRIPLET_EPOCHS)) \
    --steps_per_epoch "$STEPS" --width "$WIDTH"
evaluate softmax-long "$wd/checkpoints-softmax/ResCNN_best.keras"
