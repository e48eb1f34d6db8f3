#!/usr/bin/env bash
# The classification losses side by side (README "Classification losses"): the softmax phase of one model with
# each --loss, evaluated on both dev lists (test-other, and test-other-channels with a degraded test side).
#   MODEL=tdnn WIDTH=0.25 LOSSES="softmax aamsoftmax" bash recipes/losses.sh
# AUGMENT=reverb,telephone,babble,white trains on a channel-augmented cache of its own (build-mfcc-cache
# --augment); TRAIN_OPTIONS="--spec_augment" adds train-model options; TAG names such a variant in the rows.
# Rows go to $OUT/results.csv as losses/<model>-<loss><tag> and losses/<model>-<loss><tag>-channels.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL="${MODEL:-tdnn}"
WIDTH="${WIDTH:-0.25}"
LOSSES="${LOSSES:-softmax amsoftmax aamsoftmax}"
AUGMENT="${AUGMENT:-}"
TRAIN_OPTIONS="${TRAIN_OPTIONS:-}"
TAG="${TAG:-}"
if [ -n "$AUGMENT" ]; then BASE="$OUT/channels-${AUGMENT//,/-}"; CACHE_OPTIONS=(--augment "$AUGMENT")
else BASE="$OUT/clean"; CACHE_OPTIONS=(); fi
mkdir -p "$BASE"

cli build-mfcc-cache --working_dir "$BASE" --audio_dir "$DATA/LibriSpeech/train-clean-100" "${CACHE_OPTIONS[@]}"
cli build-keras-inputs --working_dir "$BASE" --counts_per_speaker 100,10

for loss in $LOSSES; do
  run="$MODEL-$loss$TAG"
  wd="$OUT/losses/$run"
  shared_dir "$wd" "$BASE"
  # shellcheck disable=SC2086  # TRAIN_OPTIONS is a list of options.
  cli train-model --working_dir "$wd" --pre_training_phase --model "$MODEL" --loss "$loss" \
      --epochs "$SOFTMAX_EPOCHS" --steps_per_epoch "$STEPS" --width "$WIDTH" $TRAIN_OPTIONS
  prefix="$wd/checkpoints-softmax/${NAMES[$MODEL]}"
  evaluate_trained "losses/$run" "$prefix"
  TRIALS="$DATA/trials/librispeech-test-other-channels.txt" TEST_ROOT="$DATA" \
      evaluate_trained "losses/$run-channels" "$prefix"
done
