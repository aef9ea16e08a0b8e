#!/usr/bin/env bash
# Fresh machine -> the whole test suite. CUDA tests skip without a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
python -m pytest -q "$@"
