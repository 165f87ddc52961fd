#!/usr/bin/env bash
# Reproduces the paper's comparisons with the shipped optimizers: every baseline's learning rate is
# grid-searched on validation problems, then all optimizers run on the same held-out test problems.
# Writes a plot (.png), a table (.md) and the numbers (.json) per experiment under runs/paper/.
# Usage: scripts/paper_experiments.sh [extra l2l-fast evaluate options, e.g. --threads 1]
set -euo pipefail
cd "$(dirname "$0")/.."
export L2L_FAST_DATA="${L2L_FAST_DATA:-$(cd .. && pwd)/shared/datasets}"
py=".venv/bin/python -m l2l_fast.cli evaluate --out runs/paper --problems 16 --tune-problems 10"
baselines="--optimizer adam --optimizer rmsprop --optimizer nag --optimizer sgd"

$py --task quadratic --optimizer pretrained:quadratic $baselines "$@"
$py --task mnist --optimizer pretrained:mnist $baselines "$@"                        # 100 steps
$py --task mnist --optimizer pretrained:mnist $baselines --steps 200 "$@"            # trained on 100
$py --task mnist --hidden 40 --optimizer pretrained:mnist $baselines "$@"            # 40 units
$py --task mnist --hidden 20 20 --optimizer pretrained:mnist $baselines "$@"         # 2 hidden layers
$py --task mnist --activation relu --optimizer pretrained:mnist $baselines "$@"      # ReLU
