#!/usr/bin/env bash
# The README's model table: ResCNN vs TDNN vs GRU, softmax-trained at the same budget (epochs x steps) on
# LibriSpeech train-clean-100, evaluated alone and fused on the test-other trial list. Reuses the cache, the
# model inputs and the ResCNN softmax run of `recipes/librispeech_100.sh clean` (run that first).
#   bash recipes/models.sh
# Rows go to $OUT/results.csv: config,eer_percent,min_dcf,train_seconds,checkpoint (a re-run replaces them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data}"
OUT="${OUT:-$HOME/.deep-speaker-wd/librispeech-100}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-12}"
STEPS="${STEPS:-50}"
TRIALS="$DATA/trials/librispeech-test-other.txt"
TEST_ROOT="$DATA/LibriSpeech/test-other"
PY="$ROOT/.venv/bin/python"
BASE="$OUT/clean"
[ -f "$BASE/checkpoints-softmax/ResCNN_best.keras" ] || { echo "Run recipes/librispeech_100.sh clean first." >&2; exit 1; }

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }

evaluate() {  # name seconds checkpoint [checkpoint ...]  (seconds: training wall time, - for fusions)
  local name="$1" seconds="$2" line args=()
  shift 2
  for checkpoint in "$@"; do args+=(--checkpoint_file "$checkpoint"); done
  line="$(cli eval-trials --trials "$TRIALS" --audio_root "$TEST_ROOT" "${args[@]}" \
          --scores_file "$OUT/models-$name.scores.csv" | tail -1)"
  echo "$name: $line" >&2
  touch "$OUT/results.csv"
  grep -v "^models/$name," "$OUT/results.csv" > "$OUT/results.csv.tmp" || true
  mv "$OUT/results.csv.tmp" "$OUT/results.csv"
  echo "models/$name,$(echo "$line" | sed -E 's/EER = ([0-9.]+) %, minDCF\(p_target=0.01\) = ([0-9.]+)/\1,\2/'),$seconds,$*" \
    >> "$OUT/results.csv"
}

declare -A WIDTH=([tdnn]=0.5 [gru]=0.25)
declare -A NAME=([tdnn]=TDNN [gru]=GRU)
for model in tdnn gru; do
  wd="$OUT/models/$model"
  mkdir -p "$wd"
  for shared in audio-fbanks keras-inputs; do ln -sfn "$BASE/$shared" "$wd/$shared"; done
  cli train-model --working_dir "$wd" --model "$model" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" \
      --steps_per_epoch "$STEPS" --width "${WIDTH[$model]}"
  state="$wd/checkpoints-softmax/${NAME[$model]}_state.json"
  evaluate "$model" "$("$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["seconds"]))' "$state")" \
      "$wd/checkpoints-softmax/${NAME[$model]}_best.keras"
done

RESCNN="$BASE/checkpoints-softmax/ResCNN_best.keras"
TDNN="$OUT/models/tdnn/checkpoints-softmax/TDNN_best.keras"
GRU="$OUT/models/gru/checkpoints-softmax/GRU_best.keras"
evaluate rescnn+tdnn - "$RESCNN" "$TDNN"
evaluate rescnn+gru - "$RESCNN" "$GRU"
evaluate rescnn+tdnn+gru - "$RESCNN" "$TDNN" "$GRU"
# The TDNN given the ResCNN's wall time: its 12-epoch run continued to 24 epochs in a copy.
wd="$OUT/models/tdnn-24"
mkdir -p "$wd"
for shared in audio-fbanks keras-inputs; do ln -sfn "$BASE/$shared" "$wd/$shared"; done
[ -d "$wd/checkpoints-softmax" ] || cp -r "$OUT/models/tdnn/checkpoints-softmax" "$wd/checkpoints-softmax"
cli train-model --working_dir "$wd" --model tdnn --pre_training_phase --epochs $((2 * SOFTMAX_EPOCHS)) \
    --steps_per_epoch "$STEPS" --width "${WIDTH[tdnn]}"
evaluate tdnn-24 "$("$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["seconds"]))' \
    "$wd/checkpoints-softmax/TDNN_state.json")" "$wd/checkpoints-softmax/TDNN_best.keras"
evaluate rescnn+tdnn-24 - "$RESCNN" "$wd/checkpoints-softmax/TDNN_best.keras"

SEMIHARD="$BASE/triplet-semihard/checkpoints-triplets/ResCNN_best.keras"
[ -f "$SEMIHARD" ] && evaluate rescnn-semihard+tdnn - "$SEMIHARD" "$TDNN"
