#!/usr/bin/env bash
# The README's model table: ResCNN vs TDNN vs GRU, softmax-trained at the same budget (epochs x steps) on
# LibriSpeech train-clean-100, evaluated alone and fused on the test-other trial list. Reuses the cache, the
# model inputs and the ResCNN runs of `recipes/librispeech_100.sh clean` (run that first); then the ResCNN and
# the TDNN with two more seeds, and each model's softmax checkpoint continued with semihard triplets.
#   bash recipes/models.sh
# Rows go to $OUT/results.csv as models/<run> (recipes/common.sh; fusions have no training seconds, "-").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BASE="$OUT/clean"
[ -f "$BASE/checkpoints-softmax/ResCNN_best.keras" ] || { echo "Run recipes/librispeech_100.sh clean first." >&2; exit 1; }

declare -A WIDTH=([rescnn]=0.25 [tdnn]=0.5 [gru]=0.25)
declare -A NAME=([rescnn]=ResCNN [tdnn]=TDNN [gru]=GRU)
for model in tdnn gru; do
  wd="$OUT/models/$model"
  shared_dir "$wd" "$BASE"
  cli train-model --working_dir "$wd" --model "$model" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" \
      --steps_per_epoch "$STEPS" --width "${WIDTH[$model]}"
  evaluate_trained "models/$model" "$wd/checkpoints-softmax/${NAME[$model]}"
done

RESCNN="$BASE/checkpoints-softmax/ResCNN_best.keras"
TDNN="$OUT/models/tdnn/checkpoints-softmax/TDNN_best.keras"
GRU="$OUT/models/gru/checkpoints-softmax/GRU_best.keras"
evaluate models/rescnn+tdnn - "$RESCNN" "$TDNN"
evaluate models/rescnn+gru - "$RESCNN" "$GRU"
evaluate models/rescnn+tdnn+gru - "$RESCNN" "$TDNN" "$GRU"
# The TDNN given the ResCNN's wall time: its 12-epoch run continued to 24 epochs in a copy.
wd="$OUT/models/tdnn-24"
shared_dir "$wd" "$BASE"
[ -d "$wd/checkpoints-softmax" ] || cp -r "$OUT/models/tdnn/checkpoints-softmax" "$wd/checkpoints-softmax"
cli train-model --working_dir "$wd" --model tdnn --pre_training_phase --epochs $((2 * SOFTMAX_EPOCHS)) \
    --steps_per_epoch "$STEPS" --width "${WIDTH[tdnn]}"
evaluate_trained models/tdnn-24 "$wd/checkpoints-softmax/TDNN"
evaluate models/rescnn+tdnn-24 - "$RESCNN" "$wd/checkpoints-softmax/TDNN_best.keras"

# The ResCNN and TDNN softmax runs again with other seeds: the spread between seeds is the noise of these tables.
declare -A SEEDED=([rescnn]="$RESCNN" [tdnn]="$TDNN")
for model in rescnn tdnn; do
  for seed in 7 11; do
    wd="$OUT/models/$model-seed-$seed"
    shared_dir "$wd" "$BASE"
    cli train-model --working_dir "$wd" --model "$model" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" \
        --steps_per_epoch "$STEPS" --width "${WIDTH[$model]}" --seed "$seed"
    evaluate_trained "models/$model-seed-$seed" "$wd/checkpoints-softmax/${NAME[$model]}"
    SEEDED[$model]+=" $wd/checkpoints-softmax/${NAME[$model]}_best.keras"
  done
  # shellcheck disable=SC2086  # one checkpoint per word
  evaluate "models/$model-3-seeds" - ${SEEDED[$model]}
done
# Two TDNNs take about the training time of one ResCNN.
evaluate models/tdnn-2-seeds - "$TDNN" "$OUT/models/tdnn-seed-7/checkpoints-softmax/TDNN_best.keras"

# The TDNN and the GRU continued with semihard triplets, as recipes/librispeech_100.sh does for the ResCNN.
for model in tdnn gru; do
  wd="$OUT/models/$model-semihard"
  shared_dir "$wd" "$BASE"
  ln -sfn "$OUT/models/$model/checkpoints-softmax" "$wd/checkpoints-softmax"
  cli train-model --working_dir "$wd" --model "$model" --triplet_mining semihard --epochs "$TRIPLET_EPOCHS" \
      --steps_per_epoch "$STEPS" --history_size 2000 --refresh_every 25
  evaluate_trained "models/$model-semihard" "$wd/checkpoints-triplets/${NAME[$model]}"
done

SEMIHARD="$BASE/triplet-semihard/checkpoints-triplets/ResCNN_best.keras"
if [ -f "$SEMIHARD" ]; then
  evaluate models/rescnn-semihard+tdnn - "$SEMIHARD" "$TDNN"
  evaluate models/rescnn-semihard+tdnn-semihard - "$SEMIHARD" "$OUT/models/tdnn-semihard/checkpoints-triplets/TDNN_best.keras"
fi
