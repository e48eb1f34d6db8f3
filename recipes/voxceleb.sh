#!/usr/bin/env bash
# Full-size VoxCeleb recipe at the paper's width (1.0), for a GPU: train on the VoxCeleb1 or VoxCeleb2 dev set,
# evaluate on the official VoxCeleb1-O list (veri_test2.txt, the cleaned one). The data is not downloaded here:
# request it from https://www.robots.ox.ac.uk/~vgg/data/voxceleb/ and use it under its licence.
#   VOX_DEV=/data/vox1_dev_wav/wav VOX1_TEST=/data/vox1_test_wav/wav TRIALS=/data/veri_test2.txt \
#     bash recipes/voxceleb.sh
# Settings (environment): VOX_DEV (speaker/video/utterance.wav of the dev set; VoxCeleb2's aac folder works once
# converted: stage 1), VOX1_TEST (VoxCeleb1 test set's wav folder, the trial paths' root), TRIALS (veri_test2.txt),
# OUT (working dir), and those of recipes/full_size.sh (WIDTH, SAMPLER, COUNTS, epochs, STEPS, SHARD, STAGE /
# STOP_AFTER). Stages: 1 m4a -> wav (VoxCeleb2; needs ffmpeg; skipped when no .m4a lacks its .wav), 2 feature
# cache, 3 model inputs (or the packed store), 4 softmax, 5 triplet, 6 evaluation. Resumable; a finished stage does
# nothing. Time per softmax epoch on one GPU: README, "Your own corpus".
set -euo pipefail
VOX_DEV="${VOX_DEV:?set VOX_DEV to the dev set folder (speaker/video/utterance.wav)}"
OUT="${OUT:-$HOME/.deep-speaker-wd/voxceleb}"
STOP_AFTER="${STOP_AFTER:-6}"
source "$(dirname "${BASH_SOURCE[0]}")/full_size.sh"
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

cache_stage 2 "$VOX_DEV"
training_stages 3

if run 6; then
  cli eval-trials --trials "${TRIALS:?set TRIALS to veri_test2.txt}" \
      --audio_root "${VOX1_TEST:?set VOX1_TEST to the VoxCeleb1 test wav folder}" \
      --checkpoint_file "$OUT/checkpoints-triplets/ResCNN_best.keras" \
      --scores_file "$OUT/voxceleb1-o.scores.csv" --det_plot "$OUT/voxceleb1-o.det.png"
fi
