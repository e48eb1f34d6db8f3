#!/usr/bin/env bash
# The README's mining table: train on LibriSpeech train-clean-100 (251 speakers), evaluate on the unseen
# speakers of the test-other trial list. One softmax phase, then random, hard and semihard triplets from its best
# checkpoint, each in its own working dir sharing the cache, inputs and softmax checkpoints; and, for the same
# budget as softmax + triplets, the softmax phase continued for as many epochs as the triplet phase.
#   bash recipes/librispeech_100.sh [clean|augmented]
# Rows go to $OUT/results.csv as <variant>/<run> (recipes/common.sh); finished stages do nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VARIANT="${1:-clean}"
WIDTH="${WIDTH:-0.25}"
MINING_MODES="${MINING_MODES:-random hard semihard}"
SOFTMAX_LONG="${SOFTMAX_LONG:-1}"  # 0 skips the softmax-only run of the same budget
BASE="$OUT/$VARIANT"
case "$VARIANT" in
  clean) AUGMENT=() ;;
  augmented) AUGMENT=(--speed_perturb --noise white,pink --snr_range 5,20) ;;
  *) echo "Unknown variant: $VARIANT (clean or augmented)" >&2; exit 2 ;;
esac
mkdir -p "$BASE"

cli build-mfcc-cache --working_dir "$BASE" --audio_dir "$DATA/LibriSpeech/train-clean-100" "${AUGMENT[@]}"
cli build-keras-inputs --working_dir "$BASE" --counts_per_speaker 100,10

cli train-model --working_dir "$BASE" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" --steps_per_epoch "$STEPS" \
    --width "$WIDTH"
evaluate_trained "$VARIANT/softmax" "$BASE/checkpoints-softmax/ResCNN"

for mining in $MINING_MODES; do
  wd="$BASE/triplet-$mining"
  shared_dir "$wd" "$BASE"
  ln -sfn "$BASE/checkpoints-softmax" "$wd/checkpoints-softmax"
  cli train-model --working_dir "$wd" --no_pre_training_phase --triplet_mining "$mining" --epochs "$TRIPLET_EPOCHS" \
      --steps_per_epoch "$STEPS" --width "$WIDTH" --history_size 2000 --refresh_every 25
  evaluate_trained "$VARIANT/triplet-$mining" "$wd/checkpoints-triplets/ResCNN"
done

[ "$SOFTMAX_LONG" = 1 ] || exit 0
wd="$BASE/softmax-long"
shared_dir "$wd" "$BASE"
[ -d "$wd/checkpoints-softmax" ] || cp -r "$BASE/checkpoints-softmax" "$wd/checkpoints-softmax"
cli train-model --working_dir "$wd" --pre_training_phase --epochs $((SOFTMAX_EPOCHS + TRIPLET_EPOCHS)) \
    --steps_per_epoch "$STEPS" --width "$WIDTH"
evaluate_trained "$VARIANT/softmax-long" "$wd/checkpoints-softmax/ResCNN"
