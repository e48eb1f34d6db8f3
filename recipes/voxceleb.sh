#!/usr/bin/env bash
# Full-size VoxCeleb recipe at the paper's width (1.0), for a GPU: train on the VoxCeleb1 or VoxCeleb2 dev set,
# evaluate on the official VoxCeleb1-O list (veri_test2.txt, the cleaned one). The data is not downloaded here:
# request it from https://www.robots.ox.ac.uk/~vgg/data/voxceleb/ and use it under its licence.
#   VOX_DEV=/data/vox1_dev_wav/wav VOX1_TEST=/data/vox1_test_wav/wav TRIALS=/data/veri_test2.txt \
#     bash recipes/voxceleb.sh
# Settings (environment): VOX_DEV (speaker/video/utterance.wav of the dev set; VoxCeleb2's aac folder works once
# converted: stage 1), VOX1_TEST (VoxCeleb1 test set's wav folder, the trial paths' root), TRIALS (veri_test2.txt),
# OUT (working dir), WIDTH (1.0), COUNTS (crops per speaker "TRAIN,TEST", 600,100), SOFTMAX_EPOCHS,
# TRIPLET_EPOCHS, STEPS (triplet batches per epoch), SHARD (K/N: build part K of the cache only; run again
# without it once every part is built), STAGE / STOP_AFTER (first and last stage to run).
# Stages: 1 m4a -> wav (VoxCeleb2; needs ffmpeg; skipped when no .m4a lacks its .wav), 2 feature cache,
# 3 model inputs, 4 softmax, 5 triplet, 6 evaluation. Resumable; a finished stage does nothing. Expected time per
# softmax epoch on one GPU: README, "Your own corpus" (estimated from this CPU's step time and the FLOP count).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VOX_DEV="${VOX_DEV:?set VOX_DEV to the dev set folder (speaker/video/utterance.wav)}"
OUT="${OUT:-$HOME/.deep-speaker-wd/voxceleb}"
WIDTH="${WIDTH:-1.0}"
COUNTS="${COUNTS:-600,100}"
SOFTMAX_EPOCHS="${SOFTMAX_EPOCHS:-100}"
TRIPLET_EPOCHS="${TRIPLET_EPOCHS:-100}"
STEPS="${STEPS:-1000}"
STAGE="${STAGE:-1}"
STOP_AFTER="${STOP_AFTER:-6}"
PY="${PY:-$ROOT/.venv/bin/python}"

cli() { (cd "$ROOT" && "$PY" cli.py "$@"); }
run() { [ "$1" -ge "$STAGE" ] && [ "$1" -le "$STOP_AFTER" ]; }
mkdir -p "$OUT"

if run 1; then  # VoxCeleb2 ships AAC (.m4a), which libsndfile cannot read: a 16 kHz mono wav beside each.
  if find "$VOX_DEV" -name '*.m4a' -print -quit | grep -q .; then
    command -v ffmpeg >/dev/null || { echo "Error: $VOX_DEV holds .m4a files; install ffmpeg to convert them." >&2
                                      exit 1; }
    find "$VOX_DEV" -name '*.m4a' -print0 | xargs -0 -P "$(nproc)" -I{} sh -c '[ -f "${1%.m4a}.wav" ] || {
      ffmpeg -nostdin -loglevel error -y -i "$1" -ac 1 -ar 16000 -f wav "${1%.m4a}.wav.part" &&
      mv "${1%.m4a}.wav.part" "${1%.m4a}.wav"; }' _ {}  # .part: an interrupted conversion is not read as audio.
  fi
fi

if run 2; then
  cli build-mfcc-cache --working_dir "$OUT" --audio_dir "$VOX_DEV" ${SHARD:+--shard "$SHARD"}
  [ -z "${SHARD:-}" ] || { echo "Part $SHARD of the cache is built; run again without SHARD once all are." >&2; exit 0; }
fi

if run 3; then
  cli build-keras-inputs --working_dir "$OUT" --counts_per_speaker "$COUNTS"
fi
# Fresh random windows instead of fixed crops: cli build-packed-store --working_dir "$OUT", then add --sampler windows
# to both train-model stages.

if run 4; then
  cli train-model --working_dir "$OUT" --pre_training_phase --epochs "$SOFTMAX_EPOCHS" --width "$WIDTH"
fi

if run 5; then
  cli train-model --working_dir "$OUT" --no_pre_training_phase --epochs "$TRIPLET_EPOCHS" --steps_per_epoch "$STEPS" \
      --width "$WIDTH" --history_size 25600
fi

if run 6; then
  cli eval-trials --trials "${TRIALS:?set TRIALS to veri_test2.txt}" \
      --audio_root "${VOX1_TEST:?set VOX1_TEST to the VoxCeleb1 test wav folder}" \
      --checkpoint_file "$OUT/checkpoints-triplets/ResCNN_best.keras" \
      --scores_file "$OUT/voxceleb1-o.scores.csv" --det_plot "$OUT/voxceleb1-o.det.png"
fi
