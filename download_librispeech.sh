#!/usr/bin/env bash
# Downloads, checks and extracts LibriSpeech subsets (default: train-clean-100) into <working_dir>/LibriSpeech.
#   bash download_librispeech.sh [working_dir] [subset ...]   (working_dir: an existing folder or a path with a /)
#   subsets: train-clean-100 train-clean-360 train-other-500 dev-clean dev-other test-clean test-other
#   (train-clean-100 + train-clean-360 is "460 h"; the three train subsets are "960 h")
# Resumable: a partial archive continues (wget -c / curl -C -), an extracted subset (marked LibriSpeech/.<subset>.done)
# is skipped. Each archive is checked against openslr's md5 (https://www.openslr.org/resources/12/md5sum.txt)
# before extracting; a mismatched one is deleted (run again to download it anew). LIBRISPEECH_URL picks a mirror
# (e.g. https://us.openslr.org/resources/12 or https://openslr.elda.org/resources/12).
set -euo pipefail

declare -A MD5=(
  [train-clean-100]=2a93770f6d5c6c964bc36631d331a522
  [train-clean-360]=c0e676e450a7ff2f54aeade5171606fa
  [train-other-500]=d1a0fd59409feb2c614ce4d30c387708
  [dev-clean]=42e2234ba48799c1f50f24a7926300a1
  [dev-other]=c8d0bcc9cca99d4f8b62fcc847357931
  [test-clean]=32fa31d27d2e1cad72775fee3f4849a9
  [test-other]=fb5a50374b501bb3bac4815ee91d3135
)
NAMES="train-clean-100 train-clean-360 train-other-500 dev-clean dev-other test-clean test-other"
URL="${LIBRISPEECH_URL:-https://www.openslr.org/resources/12}"

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
WORKING_DIR="$HOME/.deep-speaker-wd"
# The first argument is the working dir when it is a path (holds a "/") or an existing folder; else a subset.
if [ $# -gt 0 ] && [ -z "${MD5[$1]+set}" ] && { [[ "$1" == */* ]] || [ -d "$1" ]; }; then
  WORKING_DIR="$1"
  shift
fi
SUBSETS=("${@:-train-clean-100}")
for subset in "${SUBSETS[@]}"; do
  if [ -z "${MD5[$subset]+set}" ]; then
    echo "Error: unknown LibriSpeech subset '$subset'; choose among: $NAMES (a new working dir is a path:" \
         "./$subset)." >&2
    exit 2
  fi
done

download() {  # archive: continues a partial download
  if command -v wget >/dev/null; then
    wget -c -q --show-progress "$URL/$1"
  elif command -v curl >/dev/null; then
    curl -fL -C - -o "$1" "$URL/$1"
  else
    echo "Error: neither wget nor curl is installed; install one of them." >&2
    exit 1
  fi
}

checked() {  # archive subset: whether the archive is there with openslr's md5
  [ -f "$1" ] && [ "$(md5sum "$1" | cut -d' ' -f1)" = "${MD5[$2]}" ]
}

check() {  # archive subset: stops unless the archive's md5 is openslr's (a damaged archive is deleted)
  local sum
  sum="$(md5sum "$1" | cut -d' ' -f1)"
  if [ "$sum" != "${MD5[$2]}" ]; then
    rm -f "$1"
    echo "Error: $WORKING_DIR/$1: md5 $sum, expected ${MD5[$2]} (damaged or incomplete download); deleted it," \
         "run the script again to download it anew." >&2
    exit 1
  fi
}

mkdir -p "$WORKING_DIR"
cd "$WORKING_DIR"
for subset in "${SUBSETS[@]}"; do
  if [ -d "LibriSpeech/$subset" ] && [ -f "LibriSpeech/.$subset.done" ]; then
    echo "LibriSpeech/$subset is already extracted." >&2
    continue
  fi
  archive="$subset.tar.gz"
  if ! checked "$archive" "$subset"; then  # absent or partial: (continue to) download it, then check it.
    download "$archive"
    echo "Checking $archive ..." >&2
    check "$archive" "$subset"
  fi
  echo "Extracting $archive ..." >&2
  tar xzf "$archive"  # an interrupted extraction is done again (no .done mark yet).
  touch "LibriSpeech/.$subset.done"
  rm "$archive"
done
echo "LibriSpeech is in $WORKING_DIR/LibriSpeech (CC BY 4.0, see its LICENSE.TXT)." >&2
