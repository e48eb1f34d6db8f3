#!/usr/bin/env bash
# Full-size LibriSpeech recipe at the paper's width (1.0), for a GPU: train on train-clean-100, 460 h
# (train-clean-100 + train-clean-360) or 960 h (+ train-other-500), evaluate on test-clean and test-other with
# trial lists it writes (every pair of utterances, same-text pairs left out: recipes/make_trials.py).
#   SUBSETS=460 bash recipes/librispeech.sh
# Settings (environment): SUBSETS (train-clean-100 | 460 | 960), LIBRISPEECH (the folder holding the subsets,
# default $HOME/.deep-speaker-wd/LibriSpeech), DOWNLOAD=1 (fetch the subsets first, download_librispeech.sh),
# OUT (working dir), WIDTH (1.0), COUNTS (crops per speaker "TRAIN,TEST", 600,100), SOFTMAX_EPOCHS, TRIPLET_EPOCHS,
# STEPS (triplet batches per epoch), SHARD (K/N: build part K of the cache only, e.g. one process per machine;
# run the recipe again without it once every part is built), STAGE / STOP_AFTER (first and last stage to run).
# Stages: 1 training tree, 2 feature cache, 3 trial lists, 4 model inputs, 5 softmax, 6 triplet, 7 evaluation.
# Every stage is resumable and a finished one does nothing. Expected time per softmax epoch on one GPU: README,
# "Your own corpus" (estimated from this CPU's measured step time and the FLOP count; no GPU measurement).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUBSETS="${SUBSETS:-train-clean-100}"
LIBRISPEECH="${LIBRISPEECH:-$HOME/.deep-speaker-wd/LibriSpeech}"
OUT="${OUT:-$HOME/.deep-speaker-wd/librispeech-$SUBSETS}"
WIDTH="${WIDTH:-1.0}"
COUNTS="${COUNTS:-600,100}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-100}"
TRIPLET_EPOCHS="${TRIPLET_EPOCHS:-100}"
STEPS="${STEPS:-1000}"
STAGE="${STAGE:-1}"
STOP_AFTER="${STOP_AFTER:-7}"
PY="${PY:-$ROOT/.venv/bin/python}"
TESTS=(test-clean test-other)

case "$SUBSETS" in
  train-clean-100|100) TRAIN=(train-clean-100) ;;
  460) TRAIN=(train-clean-100 train-clean-360) ;;
  960) TRAIN=(train-clean-100 train-clean-360 train-other-500) ;;
  *) echo "Error: SUBSETS=$SUBSETS: expected train-clean-100, 460 or 960." >&2; exit 2 ;;
esac

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }
run() { [ "$1" -ge "$STAGE" ] && [ "$1" -le "$STOP_AFTER" ]; }

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

if run 2; then
  cli build-mfcc-cache --working_dir "$OUT" --audio_dir "$OUT/train-audio" ${SHARD:+--shard "$SHARD"}
  [ -z "${SHARD:-}" ] || { echo "Part $SHARD of the cache is built; run again without SHARD once all are." >&2; exit 0; }
fi

if run 3; then
  for test in "${TESTS[@]}"; do
    [ -f "$OUT/trials/librispeech-$test.txt" ] ||
      "$PY" "$ROOT/recipes/make_trials.py" --audio_dir "$LIBRISPEECH/$test" --out "$OUT/trials/librispeech-$test.txt"
  done
fi

if run 4; then
  cli build-keras-inputs --working_dir "$OUT" --counts_per_speaker "$COUNTS"
fi
# Fresh random windows instead of fixed crops: cli build-packed-store --working_dir "$OUT", then add --sampler windows
# to both train-model stages.

if run 5; then
  cli train-model --working_dir "$OUT" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" --width "$WIDTH"
fi

if run 6; then
  cli train-model --working_dir "$OUT" --no_pre_training_phase --epochs "$TRIPLET_EPOCHS" --steps_per_epoch "$STEPS" \
      --width "$WIDTH" --history_size 25600
fi

if run 7; then
  for test in "${TESTS[@]}"; do
    cli eval-trials --trials "$OUT/trials/librispeech-$test.txt" --audio_root "$LIBRISPEECH/$test" \
        --checkpoint_file "$OUT/checkpoints-triplets/ResCNN_best.keras" \
        --scores_file "$OUT/librispeech-$test.scores.csv" --det_plot "$OUT/librispeech-$test.det.png"
  done
fi
