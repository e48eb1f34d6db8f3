#!/usr/bin/env bash
# The README's TDNN ablation table: one change at a time to the TDNN of recipes/models.sh (width 0.5, softmax
# only, SOFTMAX_EPOCHS x STEPS batches, seed 123), each in its own working dir sharing the cache and model inputs
# of `recipes/librispeech_100.sh clean` (run that first; `augmented` needs its augmented variant too), evaluated on
# the test-other trial list. The unchanged TDNN's seed repeats are in recipes/models.sh.
#   bash recipes/tdnn_ablations.sh [name ...]    (default: every ablation below, in order)
# Rows go to $OUT/results.csv as tdnn/<name>; finished runs are only re-evaluated.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

declare -A ABLATIONS=(
  [bn-before-relu]="--bn_before_relu"
  [dropout-0.2]="--dropout 0.2"
  [lr-3e-3]="--learning_rate 3e-3"
  [lr-3e-4]="--learning_rate 3e-4"
  [width-0.25]="--width 0.25"
  [pool-512]="--tdnn_layers 512:5:1,512:3:2,512:3:3,512:1:1,512:1:1"
  [width-1.0]="--width 1.0"
  [augmented]=""
)
declare -A VARIANT=([augmented]=augmented)  # the training data of an ablation, when not clean
ORDER=(bn-before-relu dropout-0.2 lr-3e-3 lr-3e-4 width-0.25 pool-512 width-1.0 augmented)

for name in "${@:-${ORDER[@]}}"; do
  [ -n "${ABLATIONS[$name]+set}" ] || { echo "Unknown ablation: $name (one of: ${ORDER[*]})" >&2; exit 2; }
  base="$OUT/${VARIANT[$name]:-clean}"
  [ -d "$base/keras-inputs" ] || { echo "Run recipes/librispeech_100.sh ${VARIANT[$name]:-clean} first." >&2; exit 1; }
  wd="$OUT/tdnn-ablations/$name"
  shared_dir "$wd" "$base"
  # shellcheck disable=SC2086  # the options are words on purpose
  cli train-model --working_dir "$wd" --model tdnn --pre_training_phase --epochs "$SOFTMAX_EPOCHS" \
      --steps_per_epoch "$STEPS" --width 0.5 ${ABLATIONS[$name]}
  evaluate_trained "tdnn/$name" "$wd/checkpoints-softmax/TDNN"
done
