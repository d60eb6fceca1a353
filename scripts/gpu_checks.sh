#!/usr/bin/env bash
# The checks that need a GPU, in one run: the kernel tests on CUDA tensors (CI runs them only in
# Triton's interpreter), the kernel benchmark (bf16 and fp32) and the generation benchmark on a
# 1B-class Llama shape. Writes one log and the JSON of each benchmark under $OUT (default gpu_out/).
# Each step has its own time limit, so one that hangs leaves the others' results.
#
#   OUT=gpu_out bash scripts/gpu_checks.sh   # up to ~16 minutes (the step limits below); JSON written as steps go
#   STEPS=test_kernels,generate_b1 GEN_METHODS=base,clm_logits GEN_ROUNDS=2 bash scripts/gpu_checks.sh   # a part
#
# Through the `device` tool: write straight into its returned folder (`OUT=$OUT ...`), so a call cut off by its time
# limit still brings back the steps that finished, and choose STEPS whose limits below fit the call's limit (all of
# them add up to about 15 minutes, more than one call may run).
#
# Where peft-clm is not installed (a bare GPU machine with torch, Triton and pytest, no registry): wheels of the
# pinned transformers/peft and their missing needs in .whl/ are installed into /tmp/site, and the package is laid
# out from this checkout into /tmp/pkg (kernels/ as peft_clm.kernels, as pyproject.toml maps it).
set -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the steps run from /tmp
: > "$OUT/steps.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
STEPS=${STEPS:-kernels_bf16,test_kernels,host_overhead,generate_b1,generate_b8,kernels_fp32}
GEN_METHODS=${GEN_METHODS:-base,clm_weights,clm_hidden,clm_logits,clm_logits_a0,sequential_paths,two_model_mix,\
lora_scale}
if ! $PY -c "import peft_clm" 2>/dev/null; then
    if [ -d "$ROOT/.whl" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$ROOT"/.whl/*.whl || exit 1
    fi
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r "$ROOT/peft_clm" /tmp/pkg/ &&
        cp -r "$ROOT/kernels" /tmp/pkg/peft_clm/kernels
    export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
cd /tmp  # not the checkout: its top-level peft_clm/ has no kernels/ until installed
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton, transformers, peft, peft_clm; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'peft_clm', peft_clm.__file__)"
} 2>&1 | tee "$OUT/log.txt"

step() {  # step NAME SECONDS command...: run with a limit, append to $OUT/log.txt, report the exit status
    local name=$1 limit=$2
    shift 2
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    local t0=$SECONDS
    echo "## $name$STEP_LABEL" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "## $name$STEP_LABEL: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

step kernels_bf16 90 $PY "$ROOT/benchmarks/bench_kernels.py" --dtype bfloat16 --json "$OUT/kernels_bf16.json"
step test_kernels 150 $PY -m pytest -q -p no:cacheprovider "$ROOT/tests/test_kernels.py"
for w in 64 2048; do  # host work per decode step on the GPU, with the mix on Triton and on the torch reference
    STEP_LABEL=" (width $w)" step host_overhead 120 $PY "$ROOT/benchmarks/bench_host_overhead.py" --device cuda --width $w \
        --json "$OUT/host_overhead_w$w.json"
done
GEN=(--device cuda --model llama-1b --rounds "${GEN_ROUNDS:-1}" --repeats 2 --methods "$GEN_METHODS")
for b in 1 8; do
    step generate_b$b "${GEN_LIMIT:-$((200 * ${GEN_ROUNDS:-1}))}" $PY "$ROOT/benchmarks/bench_generate.py" "${GEN[@]}" --batches $b \
        --json "$OUT/generate_b$b.json"
done
step kernels_fp32 50 $PY "$ROOT/benchmarks/bench_kernels.py" --dtype float32 --json "$OUT/kernels_fp32.json"
cat "$OUT/steps.txt"
