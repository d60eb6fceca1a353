#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, Triton kernels included (on CPU via the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${PEFT_CLM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider "$@"
