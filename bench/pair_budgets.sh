#!/usr/bin/env bash
# What distillation buys when the teacher knows more than the student's pairs (BENCHMARKS.md,
# "Distillation: pair budgets"). For one generated world: a 50,000-image corpus, a demo teacher
# trained on all of it, its feature store; then, at each share of the corpus's pairs, the direct
# baseline tuned on val (bench/direct_sweep.py) and three seeds of DSMD, of the tuned direct
# training and of DSMD with the rest of the corpus's images as unpaired rows, all at the budget of
# `make demo`'s distillation (1,250 steps of 64). Every step skips what is finished: stop it and
# run it again, in this session or the next.
#
#     bash bench/pair_budgets.sh demo 0.1 0.3 1.0      # world, then the shares of the pairs
#     bash bench/pair_budgets.sh shifted 0.1
#     bash bench/pair_budgets.sh shifted make-demo     # make demo's setting: 8,000 pairs, the teacher
#                                                      # trained on them alone, configs/demo.json as is
#
# Results: bench/results/budget-WORLD-SHARE/ (table.md, results.json) and
# bench/results/direct-sweep-WORLD-SHARE/. Hours of CPU on two cores; run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
world=${1:?usage: bench/pair_budgets.sh WORLD SHARE...}
shift
B=.venv/bin
data=data/corpus-$world teacher=artifacts/corpus-$world-teacher features=artifacts/corpus-$world-features
# the demo world's corpus was first made as data/corpus (same seed and sizes): reuse it
if [ "$world" = demo ] && [ -f data/corpus/dataset_world.json ] && [ ! -e "$data" ]; then
    data=data/corpus teacher=artifacts/corpus-teacher features=artifacts/corpus-features
fi
if [ "${1:-}" = make-demo ]; then  # the demo world's own is make demo's (data/world, artifacts/)
    data=data/world teacher=artifacts/teacher features=artifacts/features
    if [ "$world" != demo ]; then
        data=data/world-$world teacher=artifacts/teacher-$world features=artifacts/features-$world
    fi
    [ -f "$data/dataset_world.json" ] || $B/dsmd generate --world "$world" --out "$data"
    [ -f "$teacher/manifest.json" ] || $B/dsmd train-teacher --data "$data" --out "$teacher"
    [ -f "$features/manifest.json" ] || $B/dsmd features --teacher demo --teacher-path "$teacher" --data "$data" \
        --out "$features"
    sets=(--set "data.dataset=$data" --set "data.features=$features")
    $B/python bench/direct_sweep.py --out "bench/results/direct-sweep-$world-make-demo" "${sets[@]}"
    exec $B/python bench/ablation.py --only dsmd clip-tuned --seeds 0 1 2 --out "bench/results/budget-$world-make-demo" \
        --tuned-direct "bench/results/direct-sweep-$world-make-demo/best.json" "${sets[@]}"
fi
[ -f "$data/dataset_world.json" ] || $B/dsmd generate --world "$world" --out "$data" --train 50000 --val 500 --test 1000
[ -f "$teacher/manifest.json" ] || $B/dsmd train-teacher --data "$data" --out "$teacher" --epochs 10
[ -f "$features/manifest.json" ] || $B/dsmd features --teacher demo --teacher-path "$teacher" --data "$data" --out "$features"
for share in "$@"; do
    sets=(--set "data.dataset=$data" --set "data.features=$features" --set "data.pairs_fraction=$share"
          --set optim.steps=1250)
    name=$world-$(python3 -c "print(f'{float(\"$share\"):g}')")
    $B/python bench/direct_sweep.py --out "bench/results/direct-sweep-$name" "${sets[@]}"
    only=(dsmd clip-tuned)
    [ "$share" = 1.0 ] || [ "$share" = 1 ] || only+=(dsmd-unpaired)  # all pairs leave no image unpaired
    $B/python bench/ablation.py --only "${only[@]}" --seeds 0 1 2 --out "bench/results/budget-$name" \
        --tuned-direct "bench/results/direct-sweep-$name/best.json" "${sets[@]}"
done
