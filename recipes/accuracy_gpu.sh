#!/usr/bin/env bash
# The GPU rows of README "How far 251 speakers go with a GPU's budget": models trained by recipes/train_gpu_jax.py
# on a lent GPU, evaluated here on both dev lists as recipes/accuracy.sh's rows are, with each of NORMS (default
# "none asnorm": plain and AS-normed against the training speakers of $OUT/clean), into $OUT/results.csv as
# accuracy/gpu-<name>-<step>[+<norm>]/<list>/seed<N>.
#   python recipes/train_gpu_jax.py pack --degraded_fraction 0.3 "$OUT/aug" .gpudata/aug.npz       # here
#   for seed in 1 2 3; do KERAS_BACKEND=jax python recipes/train_gpu_jax.py train .gpudata/aug.npz "$RUNS" \
#       --channels 512 --batch 256 --steps 3000 --spec_augment --seed $seed; done              # on the GPU
#   RUNS=<the folder its files came back to> bash recipes/accuracy_gpu.sh                         # here
# FUSIONS="A+B[+C...] ..." (with RUNS= to score fusions only) scores the fusion of A, B..., seed with seed, as
# accuracy/A+B...[+asnorm]: each a GPU row (gpu-<name>-<step>, restored before) or a row of recipes/accuracy.sh in
# the same $OUT (its best checkpoint).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUNS="${RUNS-}"
FUSIONS="${FUSIONS:-}"
SEEDS="${SEEDS:-1 2 3}"
NORMS="${NORMS:-none asnorm}"

trained_seconds() {  # run.json: the seconds of its last logged step, compilation included
  "$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["log"][-1]["seconds"]))' "$1"
}

checkpoint_of() {  # row seed: the checkpoint that row's run of that seed is scored with
  local row="$1" seed="$2" phase=softmax
  if [[ "$row" == gpu-* ]]; then
    row="${row#gpu-}"
    echo "$OUT/gpu/${row%-*}-seed${seed}_${row##*-}.keras"
  else
    [[ "-$row-" == *-semihard-* ]] && phase=triplets
    ls "$OUT/accuracy/$row/seed$seed/checkpoints-$phase/"*_best.keras
  fi
}

both_norms() {  # row seed seconds checkpoint...: both lists, scored with each of $NORMS (row, row+asnorm, ...)
  local norm
  for norm in $NORMS; do scored "$norm" "$@"; done
}

mkdir -p "$OUT/gpu"
for weights in ${RUNS:+"$RUNS"/*_*.npz}; do
  run="$(basename "${weights%.npz}")"  # <name>-seed<N>_<step>
  name="${run%-seed*}" seed_step="${run##*-seed}"
  checkpoint="$OUT/gpu/$run.keras"
  [ -f "$checkpoint" ] || (cd "$ROOT" && "$PY" recipes/train_gpu_jax.py restore "$weights" "$checkpoint")
  both_norms "gpu-$name-${seed_step#*_}" "${seed_step%_*}" "$(trained_seconds "$RUNS/${run%_*}.json")" "$checkpoint"
done

for fusion in $FUSIONS; do
  IFS=+ read -ra members <<< "$fusion"
  for seed in $SEEDS; do
    checkpoints=()
    for member in "${members[@]}"; do checkpoints+=("$(checkpoint_of "$member" "$seed")"); done
    both_norms "$fusion" "$seed" - "${checkpoints[@]}"
  done
done
