#!/usr/bin/env bash
# Criteo 10k FM search settings, seeds 0-2: retrain valid / test AUC at 10/5/2 % for
#   fused: the fused-optimizer search (controller over 10 epochs, floor 3) configs/criteo_fm_search.yaml
#          shipped before the own s optimizer (set below by overrides);
#   sgdG:  the own s optimizer (s0 -10, gk 1, s_lr 0.01, no floor) with gk_growth G per step.
# Prints "variant seed budget valid_auc test_auc"; a variant whose search does not reach every budget
# in its 30 epochs prints "no mask". Usage: bash benchmarks/research/criteo_search_sweep.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-out/criteo_search_sweep}
BIN=.venv/bin/pep-torchrec
DATA=$WORK/data
[ -f "$DATA/schema.json" ] || $BIN data prepare --dataset criteo --raw ../shared/data/criteo_kaggle_head10k --out "$DATA" > /dev/null
FUSED="pep.s0=0.0 pep.gk=0.0001 pep.s_optimizer=fused pep.gk_growth=0 pep.target_epochs=10 pep.min_row_dims=3"
SGD="pep.s0=-10.0 pep.gk=1.0 pep.s_optimizer=sgd pep.s_lr=0.01 pep.target_epochs=0 pep.min_row_dims=0"
run() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  local r=$WORK/$name/s$seed
  mkdir -p "$r"
  OMP_NUM_THREADS=1 $BIN train --config configs/criteo_fm_search.yaml --data "$DATA" --run-dir "$r/search" \
    --overwrite --set train.seed="$seed" train.progress=false "$@" > "$r/search.log" 2>&1
  for b in 0.1 0.05 0.02; do
    if [ ! -d "$r/search/masks/budget_$b" ]; then echo "$name $seed $b no mask"; continue; fi
    OMP_NUM_THREADS=1 $BIN train --config configs/criteo_fm_retrain.yaml --data "$DATA" --run-dir "$r/rt_$b" \
      --overwrite --mask "$r/search/masks/budget_$b" --set train.seed="$seed" train.progress=false > "$r/rt_$b.log" 2>&1
    .venv/bin/python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], round(d['valid_auc'], 4), round(d['test_auc'], 4))" \
      "$r/rt_$b/summary.json" "$name $seed $b"
  done
}
for seed in 0 1 2; do
  run fused "$seed" $FUSED
  for g in 1.012 1.024 1.05; do run "sgd$g" "$seed" $SGD pep.gk_growth=$g; done
done
