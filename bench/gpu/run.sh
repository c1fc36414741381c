#!/usr/bin/env bash
# Run ON the device machine (after bench/gpu/prepare.sh here): the GPU measurements issues #3 and #4 still need,
# as one short script within one device call (≈ 8 min; each step has its own time limit and writes its log to $OUT).
#
#   1. composite_half: Composite (S, SB, CU, CM) and AutoLoRA in fp16, the dtype ComfyUI runs an SD1.5 checkpoint in
#      on this GPU (first: what issue #4's GPU clause is read on).
#   2. composite_fp32: Composite at k = 2, 3 decomposed on the SD1.5-sized UNet as measured before (fp32 weights,
#      TF32 convolutions): S, SB (S with the conds given k times: the 2k-row call without any LoRA work), CU
#      (unmerged, auto) and CM (merged); CU / SB = the adapters' cost, SB / (k × S) = the batching gain; torch.profiler
#      traces of S, SB and CU (device kernel time / wall: host-bound or not).
#   3. switch: LoraSetSwitch B / A (merged copy, issue #3 (a)) and L / A (merged-lowvram), steady, 8 runs.
#   4. hooks: the unmerged hooks' host time per LoRA'd layer call on this machine (bench_hooks.py, ≈ 20 s).
# Arguments name the steps to run (default: all four), e.g. `bash bench/gpu/run.sh composite_half`.
#
# Locally, LC_GPU_DRY_RUN=1 PY=~/.cache/lora-composer/venv/bin/python bash bench/gpu/run.sh runs every step with
# --quick on the CPU, bf16 for fp16 (checks the script, not the numbers; ≈ 4 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/lora-composer-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torchsde, av" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev/gpu/wheels/*.whl || { echo "wheel install failed: run bench/gpu/prepare.sh here and carry .dev/gpu"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .dev/gpu/comfyui ] && export COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.dev/gpu/comfyui}

if [ -n "${LC_GPU_DRY_RUN:-}" ]; then  # the CPU has no fast fp16 convolution: bf16 stands in
  DEVICE=cpu; DEV="--device cpu --quick --threads 2 --no-memory"; BIG=""; COMPOSITE_K="2"; HALF=bf16; REPEATS=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  DEVICE=cuda; DEV="--device cuda --threads 8"; BIG="--model-channels 320 --latent 64"; COMPOSITE_K="2,3"; HALF=fp16; REPEATS=6
fi

STEPS=" ${*:-composite_half composite_fp32 switch hooks} "  # bash bench/gpu/run.sh [STEP ...]: only these steps

step() {  # step NAME SECONDS SCRIPT ARGS...: one benchmark with its own limit; its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  echo "== $name ($(date -u +%T)): $*"
  timeout "$limit" "$PY" "$@" 2>&1 | grep --line-buffered -v "^WARNING:root" | tee "$OUT/$name.log"
  echo "== $name rc=${PIPESTATUS[0]}"
}

# shellcheck disable=SC2086  # DEV and BIG are option lists
step composite_half 170 bench/bench_composite.py $DEV $BIG --timing steady --dtype $HALF --steps 10 \
  --k $COMPOSITE_K --methods S,SB,CU,CM,AU,AG --repeats $REPEATS --budget-s 100 --torch-profile
# shellcheck disable=SC2086
step composite_fp32 180 bench/bench_composite.py $DEV $BIG --timing steady --steps 10 --k $COMPOSITE_K \
  --methods S,SB,CU,CM --repeats $REPEATS --budget-s 120 --torch-profile
# shellcheck disable=SC2086
step switch 170 bench/bench_switch.py $DEV $BIG --timing steady --steps 20 --every 5 --repeats $((REPEATS + 2)) \
  --no-unmerged-table --methods ABL --budget-s 130
step hooks 45 bench/bench_hooks.py --device $DEVICE --runs 5
echo "== done ($(date -u +%T)); logs in $OUT"
