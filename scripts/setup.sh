#!/usr/bin/env bash
# Create .venv and install rwkv-app with its test tools. Sourced by demo.sh and test.sh.
# torch is pinned first so that pip never swaps it for a multi-GB CUDA build it was not asked for.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d .venv ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "torch==${RWKV_APP_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip show deepspeed >/dev/null 2>&1 || python -m pip install -q --no-build-isolation deepspeed
