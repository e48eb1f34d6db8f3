#!/usr/bin/env bash
# Downloads and extracts LibriSpeech subsets (default: train-clean-100) into <working_dir>/LibriSpeech.
#   bash download_librispeech.sh [working_dir] [subset ...]
# Resumable: partial downloads continue (wget -c / curl -C -), extracted subsets are skipped.
set -euo pipefail

WORKING_DIR="${1:-$HOME/.deep-speaker-wd}"
shift || true
SUBSETS=("${@:-train-clean-100}")
URL="https://www.openslr.org/resources/12"

mkdir -p "$WORKING_DIR"
cd "$WORKING_DIR"
for subset in "${SUBSETS[@]}"; do
  if [ -d "LibriSpeech/$subset" ] && [ -f "LibriSpeech/.$subset.done" ]; then
    echo "LibriSpeech/$subset is already extracted." >&2
    continue
  fi
  archive="$subset.tar.gz"
  if command -v wget >/dev/null; then
    wget -c "$URL/$archive"
  else
    curl -L -C - -o "$archive" "$URL/$archive"
  fi
  tar xzf "$archive"
  touch "LibriSpeech/.$subset.done"
  rm "$archive"
done
echo "LibriSpeech is in $WORKING_DIR/LibriSpeech (CC BY 4.0, see its LICENSE.TXT)." >&2
