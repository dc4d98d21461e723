#!/usr/bin/env bash
# Rebuild passes/criteria/autosparse/default_predictor.npz, the AutoSparse predictor shipped as package data.
#
# Source task: LeNet-5 (zoo:lenet5, init seed 0) on the first 30,000 MNIST training images.
# Labels: 12 rounds of iterative rewind pruning (1 epoch of SGD lr 0.05 per round, then global
# magnitude pruning of 30% of the survivors, rewind to init): final density 0.7^12 = 1.38%.
# Predictor: MLP 7-32-32-1 on per-layer RMS-standardised (w0, g0, w0*g0, |w0|, |g0|, |w0*g0|) and
# log(layer size), 20 epochs of Adam; the held-out split is a whole layer (conv2), not random weights.
# Single-threaded and seeded, so the same machine type writes the same file byte for byte.
# Cost on the 2-core dev VM (shared, noisy): collect ~7 min, train ~5 s.
#
#   bash scripts/make_autosparse_predictor.sh [WORKDIR]     # labels go to WORKDIR (default build/autosparse)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-build/autosparse}
DATA=${PAIC_DATA_DIR:-../shared/data}/mnist.npz
PAIC=${VENV:-.venv}/bin/paic
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$WORK"
"$PAIC" autosparse collect zoo:lenet5 --data "$DATA" --rounds 12 --rate 0.3 --epochs 1 --lr 0.05 --limit 30000 \
  --seed 0 --threads 1 -o "$WORK/lenet5_mnist_labels.npz" --resume
"$PAIC" autosparse train "$WORK/lenet5_mnist_labels.npz" --features w,g,wg,abs_w,abs_g,abs_wg,log_numel --standardize layer \
  --hidden 32,32 --epochs 20 --lr 0.003 --split layer --seed 0 -o passes/criteria/autosparse/default_predictor.npz
