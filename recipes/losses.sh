#!/usr/bin/env bash
# The classification losses side by side (README "Classification losses"): the softmax phase of one model with
# each --loss, evaluated on both dev lists (test-other, and test-other-channels with a degraded test side).
#   MODEL=tdnn WIDTH=0.25 LOSSES="softmax aamsoftmax" bash recipes/losses.sh
# Rows go to $OUT/results.csv as losses/<model>-<loss> and losses/<model>-<loss>-channels (recipes/common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL="${MODEL:-tdnn}"
WIDTH="${WIDTH:-0.25}"
LOSSES="${LOSSES:-softmax amsoftmax aamsoftmax}"
declare -A NAMES=([rescnn]=ResCNN [tdnn]=TDNN [gru]=GRU [ecapa]=ECAPA)
BASE="$OUT/clean"
mkdir -p "$BASE"

cli build-mfcc-cache --working_dir "$BASE" --audio_dir "$DATA/LibriSpeech/train-clean-100"
cli build-keras-inputs --working_dir "$BASE" --counts_per_speaker 100,10

for loss in $LOSSES; do
  wd="$OUT/losses/$MODEL-$loss"
  shared_dir "$wd" "$BASE"
  cli train-model --working_dir "$wd" --pre_training_phase --model "$MODEL" --loss "$loss" \
      --epochs "$SOFTMAX_EPOCHS" --steps_per_epoch "$STEPS" --width "$WIDTH"
  prefix="$wd/checkpoints-softmax/${NAMES[$MODEL]}"
  evaluate_trained "losses/$MODEL-$loss" "$prefix"
  TRIALS="$DATA/trials/librispeech-test-other-channels.txt" TEST_ROOT="$DATA" \
      evaluate_trained "losses/$MODEL-$loss-channels" "$prefix"
done
