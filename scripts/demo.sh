#!/usr/bin/env bash
# Install (idempotent) and run the offline demo: QLoRA SFT of the packaged SmolLM2-135M-Instruct on
# the medical-o1-reasoning sample in ../shared/data, on CPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m medadapt fit --config configs/demo/sft.yaml "$@"
echo "adapter: checkpoints/demo-sft/adapter   logs: tensorboard --logdir lightning_logs"
