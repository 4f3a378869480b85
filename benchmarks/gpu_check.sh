#!/usr/bin/env bash
# Everything that must be seen on a GPU, in one command (benchmarks/gpu_check.py says what it checks).
#
#   bash benchmarks/gpu_check.sh --prepare   # where PyPI is reachable: wheels + assets into .gpu/ (git-ignored, ~59 MB)
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with .gpu carried beside the checkout
#   bash benchmarks/gpu_check.sh --tiny      # the same steps on CPU with a 2-layer model, 5 arms (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --rehearse  # --tiny on CPU under the GPU image's Python and versions, before spending device time
#
# The GPU image this was written for has torch (with Triton), transformers, peft, lightning, tensorboard,
# torchmetrics, pyarrow and huggingface-hub, no hub access, and none of: bitsandbytes, torchdata, datasets,
# dill, multiprocess, jsonargparse (+ docstring-parser, typeshed-client), liger-kernel. --prepare downloads exactly
# those as Python 3.12 manylinux wheels (bitsandbytes is 43 MB of the total; liger 0.9 MB), plus the R1 tokenizer, the SFT sample
# and 100-item slices of the benchmark files from ../shared. On the GPU they are installed from the folder
# with `pip install --no-index --no-deps --target /tmp/site .gpu/whl/*.whl`. Figures: $OUT/gpu_check.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .gpu/whl .gpu/assets
  grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    bitsandbytes==0.50.2 torchdata==0.11.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 liger-kernel==0.8.5
  $PY - <<'PYEOF'
import json, shutil
from pathlib import Path
shared, assets = Path("../shared"), Path(".gpu/assets")
shutil.copytree(shared / "fixtures" / "deepseek-r1-distill-qwen-tokenizer", assets / "tokenizer", dirs_exist_ok=True)
shutil.copy(shared / "data" / "sft" / "medical_o1_reasoning_sample.json", assets / "sft.json")
src, dst = shared / "data" / "benchmarks", assets / "benchmarks"
(dst / "mmlu").mkdir(parents=True, exist_ok=True)
for name in ("medqa_us_4options_test.jsonl", "medmcqa_dev.jsonl"):
    (dst / name).write_text("".join(open(src / name).readlines()[:100]))
for csv in (src / "mmlu").glob("*_test.csv"):
    (dst / "mmlu" / csv.name).write_text("".join(open(csv).readlines()[:100]))
truth = dict(list(json.loads((src / "pubmedqa_test_ground_truth.json").read_text()).items())[:100])
docs = json.loads((src / "pubmedqa_ori_pqal.json").read_text())
(dst / "pubmedqa_test_ground_truth.json").write_text(json.dumps(truth))
(dst / "pubmedqa_ori_pqal.json").write_text(json.dumps({k: docs[k] for k in truth}))
PYEOF
  du -sh .gpu
  exit 0
fi
if [ "${1:-}" = "--rehearse" ]; then
  # The device image's Python and the versions read off it (../shared/NOTES.md, "Found on the first GPU run"), built
  # here from PyPI (~5 GB: PyPI's torch is the CUDA build; it runs on the CPU) with the packages the image holds
  # (/work/.library/device/KINDS.md) and none of the project's others: the run then installs .gpu's wheels into
  # /tmp/site exactly as on the device. What differs from the device: no GPU (the CUDA-only arms are parsed, not run).
  VENV=${GPU_IMAGE_VENV:-/tmp/gpu-image-venv}
  [ -d .gpu/whl ] || { echo "gpu_check --rehearse: no .gpu/whl; run bash benchmarks/gpu_check.sh --prepare first" >&2; exit 2; }
  if [ ! -x "$VENV/bin/python" ]; then
    PY312=""
    for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
      if "$c" --version >/dev/null 2>&1; then PY312=$c; break; fi
    done
    [ -n "$PY312" ] || { echo "gpu_check --rehearse: needs a Python 3.12 (the image's)" >&2; exit 2; }
    "$PY312" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 triton==3.6.0 transformers==5.17.0 \
    peft==0.21.0 lightning==2.6.6 accelerate==1.15.0 tensorboard torchmetrics pyarrow pandas xxhash requests httpx \
    fsspec huggingface-hub safetensors tqdm pyyaml filelock matplotlib sentence-transformers 2>&1 | grep -v "^WARNING: Location" || true
  rm -rf /tmp/site
  PYTHON="$VENV/bin/python" OUT=${OUT:-results/gpu_check-rehearsal} exec bash "$0" --tiny
fi
OUT=${OUT:-results/gpu_check}
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null; then PY=.venv/bin/python; fi
# install the carried wheels only where the packages are missing (the GPU image), never over a working venv
if ! "$PY" -c "import bitsandbytes, torchdata, datasets, jsonargparse" >/dev/null 2>&1 && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
