#!/usr/bin/env bash
# Issue 14's table at a reduced budget (README "Measured: losses, augmentation and back-ends over three seeds"):
# each row's classification phase trained once per seed, its best checkpoint evaluated on both dev lists, then
# the eval-only back-ends on the same checkpoints (mean-centring and AS-norm against the training speakers,
# the average of the last epochs).
#   SEEDS="1 2 3" ROWS="softmax aamsoftmax softmax-aug" bash recipes/accuracy.sh
#   python recipes/summarise.py "$OUT/results.csv"
# A row is its loss (softmax, amsoftmax or aamsoftmax) followed by any of these words, joined with '-':
#   aug      train on the channel-augmented cache (build-mfcc-cache --augment $AUGMENT; else the clean one)
#   specaug  train-model --spec_augment
#   val      train-model --val_speakers $VAL_SPEAKERS (the best checkpoint is then chosen by val_eer)
#   ecapa    --model ecapa --channels $ECAPA_CHANNELS instead of $MODEL
#   semihard then semihard triplets ($TRIPLET_EPOCHS x $STEPS) from the row without -semihard (trained first)
# BACKENDS (default "mean asnorm averaged") runs the back-ends on every row; BACKEND_ROWS limits them to
# those rows. Rows go to $OUT/results.csv as accuracy/<row>[+<backend>]/<list>/seed<N>, list = test-other or
# channels; FUSIONS="rowA+rowB ..." adds accuracy/<rowA>+<rowB>/<list>/seed<N>, the score fusion of the two
# rows' checkpoints of the same seed, scored by each of FUSION_NORMS (default "none"; "none mean asnorm" adds
# accuracy/<rowA>+<rowB>+<norm>/...). Cache and model inputs are built once per cache kind and shared; the
# seed changes weight initialisation and batch order, not the cached crops. A re-run skips finished runs (a
# <prefix>.done marker is written after training) and re-evaluates; ROWS="" BACKEND_ROWS="..." runs only the
# back-ends of finished rows.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL="${MODEL:-tdnn}"
WIDTH="${WIDTH:-0.25}"
SEEDS="${SEEDS:-1 2 3}"
ROWS="${ROWS-softmax aamsoftmax softmax-aug aamsoftmax-aug aamsoftmax-specaug}"
BACKENDS="${BACKENDS-mean asnorm averaged}"
BACKEND_ROWS="${BACKEND_ROWS:-$ROWS}"
FUSIONS="${FUSIONS:-}"
FUSION_NORMS="${FUSION_NORMS:-none}"
AUGMENT="${AUGMENT:-reverb,telephone,babble,white}"
AVERAGE_LAST="${AVERAGE_LAST:-3}"
VAL_SPEAKERS="${VAL_SPEAKERS:-20}"
ECAPA_CHANNELS="${ECAPA_CHANNELS:-256}"

cache() {  # kind (clean or aug): builds once and prints the working dir holding that cache and its model inputs
  local base="$OUT/$1" options=()
  [ "$1" = aug ] && options=(--augment "$AUGMENT")
  mkdir -p "$base"
  if [ ! -f "$base/keras-inputs/meta.json" ]; then
    cli build-mfcc-cache --working_dir "$base" --audio_dir "$DATA/LibriSpeech/train-clean-100" "${options[@]}" >&2
    cli build-keras-inputs --working_dir "$base" --counts_per_speaker 100,10 >&2
  fi
  echo "$base"
}

has() { [[ "-$1-" == *"-$2-"* ]]; }  # row word: whether the row names that word

model_of() { if has "$1" ecapa; then echo ecapa; else echo "$MODEL"; fi; }

train() {  # row seed: trains the row's run of that seed (once) and prints its checkpoint prefix
  local row="$1" seed="$2" wd="$OUT/accuracy/$1/seed$2" model options=() kind=clean phase=softmax prefix
  model="$(model_of "$row")"
  has "$row" semihard && phase=triplets
  prefix="$wd/checkpoints-$phase/${NAMES[$model]}"
  if [ -f "$prefix.done" ]; then
    echo "$prefix"
    return
  fi
  has "$row" aug && kind=aug
  shared_dir "$wd" "$(cache "$kind")"
  has "$row" specaug && options+=(--spec_augment)
  has "$row" val && options+=(--val_speakers "$VAL_SPEAKERS")
  if has "$row" semihard; then
    ln -sfn "$(dirname "$(train "${row%-semihard}" "$seed")")" "$wd/checkpoints-softmax"
    cli train-model --working_dir "$wd" --model "$model" --triplet_mining semihard --epochs "$TRIPLET_EPOCHS" \
        --steps_per_epoch "$STEPS" --history_size 2000 --refresh_every 25 --average_last "$AVERAGE_LAST" \
        --seed "$seed" "${options[@]}" >&2
  else
    [ "$model" = ecapa ] && options+=(--channels "$ECAPA_CHANNELS")
    cli train-model --working_dir "$wd" --pre_training_phase --model "$model" --loss "${row%%-*}" \
        --epochs "$SOFTMAX_EPOCHS" --steps_per_epoch "$STEPS" --width "$WIDTH" --average_last "$AVERAGE_LAST" \
        --seed "$seed" "${options[@]}" >&2
  fi
  touch "$prefix.done"
  echo "$prefix"
}

declare -A PREFIX
for row in $ROWS; do
  for seed in $SEEDS; do
    prefix="$(train "$row" "$seed")"
    PREFIX[$row/$seed]="$prefix"
    both_lists "accuracy/$row/{list}/seed$seed" "$(seconds "${prefix}_state.json")" "${prefix}_best.keras"
  done
done

for row in $BACKEND_ROWS; do
  for seed in $SEEDS; do
    prefix="${PREFIX[$row/$seed]:-$(train "$row" "$seed")}"
    for backend in $BACKENDS; do
      if [ "$backend" = averaged ]; then
        both_lists "accuracy/$row+averaged/{list}/seed$seed" - "${prefix}_averaged.keras"
      else
        scored "$backend" "$row" "$seed" - "${prefix}_best.keras"
      fi
    done
  done
done

for fusion in $FUSIONS; do
  for seed in $SEEDS; do
    checkpoints=("$(train "${fusion%%+*}" "$seed")_best.keras" "$(train "${fusion#*+}" "$seed")_best.keras")
    for norm in $FUSION_NORMS; do scored "$norm" "$fusion" "$seed" - "${checkpoints[@]}"; done
  done
done
