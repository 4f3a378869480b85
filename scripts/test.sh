#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite offline. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (pytest-xdist), each with its share of the cores (tests/conftest.py); work stealing evens the tail.
# MEDADAPT_TEST_WORKERS=0 (or -n 0) runs serially.
exec .venv/bin/python -m pytest -q -n "${MEDADAPT_TEST_WORKERS:-2}" --dist worksteal tests "$@"
