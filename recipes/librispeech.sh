#!/usr/bin/env bash
# Full-size LibriSpeech recipe at the paper's width (1.0), for a GPU: train on train-clean-100, 460 h
# (train-clean-100 + train-clean-360) or 960 h (+ train-other-500), evaluate on test-clean and test-other with
# trial lists it writes (every pair of utterances, same-text pairs left out: recipes/make_trials.py).
#   SUBSETS=460 bash recipes/librispeech.sh
# Settings (environment): SUBSETS (train-clean-100 | 460 | 960), LIBRISPEECH (the folder holding the subsets,
# default $HOME/.deep-speaker-wd/LibriSpeech), DOWNLOAD=1 (fetch the subsets first, download_librispeech.sh),
# OUT (working dir), and those of recipes/full_size.sh (WIDTH, SAMPLER, COUNTS, epochs, STEPS, SHARD, STAGE /
# STOP_AFTER). Stages: 1 training tree, 2 feature cache, 3 trial lists, 4 model inputs (or the packed store), 5
# softmax, 6 triplet, 7 evaluation. Every stage is resumable and a finished one does nothing. Time per softmax
# epoch on one GPU: README, "Your own corpus".
set -euo pipefail
SUBSETS="${SUBSETS:-train-clean-100}"
LIBRISPEECH="${LIBRISPEECH:-$HOME/.deep-speaker-wd/LibriSpeech}"
OUT="${OUT:-$HOME/.deep-speaker-wd/librispeech-$SUBSETS}"
STOP_AFTER="${STOP_AFTER:-7}"
source "$(dirname "${BASH_SOURCE[0]}")/full_size.sh"
TESTS=(test-clean test-other)

case "$SUBSETS" in
  train-clean-100|100) TRAIN=(train-clean-100) ;;
  460) TRAIN=(train-clean-100 train-clean-360) ;;
  960) TRAIN=(train-clean-100 train-clean-360 train-other-500) ;;
  *) echo "Error: SUBSETS=$SUBSETS: expected train-clean-100, 460 or 960." >&2; exit 2 ;;
esac

if [ "${DOWNLOAD:-0}" = 1 ]; then
  bash "$ROOT/download_librispeech.sh" "$(dirname "$LIBRISPEECH")" "${TRAIN[@]}" "${TESTS[@]}"
fi
mkdir -p "$OUT"

if run 1; then  # one speaker folder per speaker of the chosen subsets (links), so the speaker is the first folder.
  mkdir -p "$OUT/train-audio"
  for subset in "${TRAIN[@]}"; do
    [ -d "$LIBRISPEECH/$subset" ] || { echo "Error: $LIBRISPEECH/$subset: missing; run with DOWNLOAD=1 or set" \
                                            "LIBRISPEECH." >&2; exit 1; }
    for speaker in "$LIBRISPEECH/$subset"/*/; do ln -sfn "${speaker%/}" "$OUT/train-audio/$(basename "$speaker")"; done
  done
fi

cache_stage 2 "$OUT/train-audio"

if run 3; then
  for test in "${TESTS[@]}"; do
    [ -f "$OUT/trials/librispeech-$test.txt" ] ||
      "$PY" "$ROOT/recipes/make_trials.py" --audio_dir "$LIBRISPEECH/$test" --out "$OUT/trials/librispeech-$test.txt"
  done
fi

training_stages 4

if run 7; then
  for test in "${TESTS[@]}"; do
    cli eval-trials --trials "$OUT/trials/librispeech-$test.txt" --audio_root "$LIBRISPEECH/$test" \
        --checkpoint_file "$OUT/checkpoints-triplets/ResCNN_best.keras" \
        --scores_file "$OUT/librispeech-$test.scores.csv" --det_plot "$OUT/librispeech-$test.det.png"
  done
fi
