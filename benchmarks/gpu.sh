#!/usr/bin/env bash
# GPU readiness, at most 10 minutes: the demo fine-tuned on CUDA in bf16 under torchrun (train.nproc 1), served,
# one JSON object last (benchmarks/gpu.py). Uses .venv when it is there (make setup), else the python on PATH, which
# must have this project's dependencies with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
exec timeout 600 "$PYTHON" benchmarks/gpu.py "$@"
