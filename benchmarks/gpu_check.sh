#!/usr/bin/env bash
# Proves the GPU path in one command (under 8 minutes on one GPU): see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--wheels .whl] [--device cuda|cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
