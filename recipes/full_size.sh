# Sourced by the full-size recipes (librispeech.sh, voxceleb.sh): their shared settings, the CLI wrapper and the
# stages they share (feature cache, training input, softmax, triplets). Settings (environment): OUT (working dir,
# set by the recipe), WIDTH (1.0), SAMPLER (fixed: crops drawn once by build-keras-inputs, COUNTS of them per
# speaker "TRAIN,TEST", 600,100; windows: a packed store and fresh random windows at every step, README "Training
# at scale"), SOFTMAX_EPOCHS, TRIPLET_EPOCHS, STEPS (triplet batches per epoch), SHARD (K/N: build part K of the
# cache only; run again without it once every part is built), STAGE / STOP_AFTER (first and last stage), PY.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WIDTH="${WIDTH:-1.0}"
SAMPLER="${SAMPLER:-fixed}"
COUNTS="${COUNTS:-600,100}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-100}"
TRIPLET_EPOCHS="${TRIPLET_EPOCHS:-100}"
STEPS="${STEPS:-1000}"
STAGE="${STAGE:-1}"
PY="${PY:-$ROOT/.venv/bin/python}"
case "$SAMPLER" in
  fixed|windows) ;;
  *) echo "Error: SAMPLER=$SAMPLER: expected fixed or windows." >&2; exit 2 ;;
esac

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }
run() { [ "$1" -ge "$STAGE" ] && [ "$1" -le "$STOP_AFTER" ]; }

cache_stage() {  # stage audio_dir: the feature cache of audio_dir (only part $SHARD when set, then stop)
  run "$1" || return 0
  cli build-mfcc-cache --working_dir "$OUT" --audio_dir "$2" ${SHARD:+--shard "$SHARD"}
  [ -z "${SHARD:-}" ] || { echo "Part $SHARD of the cache is built; run again without SHARD once all are." >&2; exit 0; }
}

training_stages() {  # first: the training input at stage first, the softmax phase at first + 1, triplets at first + 2
  if run "$1"; then
    if [ "$SAMPLER" = windows ]; then cli build-packed-store --working_dir "$OUT"
    else cli build-keras-inputs --working_dir "$OUT" --counts_per_speaker "$COUNTS"; fi
  fi
  if run $(($1 + 1)); then
    cli train-model --working_dir "$OUT" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" --width "$WIDTH" \
        --sampler "$SAMPLER"
  fi
  if run $(($1 + 2)); then
    cli train-model --working_dir "$OUT" --no_pre_training_phase --epochs "$TRIPLET_EPOCHS" \
        --steps_per_epoch "$STEPS" --width "$WIDTH" --sampler "$SAMPLER" --history_size 25600
  fi
}
