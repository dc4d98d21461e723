#!/usr/bin/env bash
# Run the test suite in ./.venv, single-threaded (the machines are 2 noisy cores). Used by the README and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"${VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
