#!/usr/bin/env bash
# One GPU check of ser_platform, ready to run on a machine with one NVIDIA GPU (H100/H200: within 8 minutes):
#   1. versions: driver, CUDA, cuDNN, GPU, torch, Ray, transformers
#   2. Ray Train with one GPU worker over nccl (an all-reduce on the GPU)
#   3. bf16 train-step throughput and MFU at the paper's sizes (benchmarks/throughput.py: batch 32, ~4.5 s)
#   4. measured peak memory of a training step at batch 32, audio padded to 15.5 s (throughput.py, 15 +- 0.5 s)
#   5. the prediction of benchmarks/memory.py for that batch (paper preset, bf16), to hold the measurement against
#   6. focus attention through SDPA and through flex_attention (benchmarks/focus_attention.py on CUDA)
#   7. `ser cache --device cuda` on a small synthetic corpus
# then prints a markdown block for BENCHMARKS.md. Every step is time-boxed; a failed or skipped step is reported
# and the others still run. Logs: $GPU_CHECK_OUT (default a new temporary folder), named in the output.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every step at tiny size (tests/integration/test_gpu_check.py)
#
# Environment: PYTHON (default python), RAY_ADDRESS (join that cluster for step 2 instead of starting one),
# GPU_CHECK_BUDGET_S (default 470: the whole check's wall-clock bound).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python}"
dry=false
if [ "${1:-}" = "--dry-run" ]; then dry=true; elif [ -n "${1:-}" ]; then echo "usage: gpu_check.sh [--dry-run]" >&2; exit 2; fi
out="${GPU_CHECK_OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$out"
: > "$out/status"
if $dry; then touch "$out/dry-run"; fi
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))

# $out/status: one line per step, tab-separated: name, exit status (- if skipped), seconds, note.
step() {  # NAME LIMIT_S COMMAND...: run it time-boxed, log to $out/NAME.log, record exit status and seconds
  local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc note=""
  shift 2
  if [ "$left" -lt 15 ]; then
    skip "$name" "out of time"
    return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 124 ]; then note="timed out after $limit s"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$note" >> "$out/status"
  echo "gpu_check: $name: exit $rc, $((SECONDS - start)) s, log $out/$name.log" >&2
}

skip() {  # NAME REASON
  printf '%s\t-\t0\tskipped: %s\n' "$1" "$2" >> "$out/status"
}

step versions 60 "$py" benchmarks/gpu_check.py versions
if $dry; then
  step ray-train 120 "$py" benchmarks/gpu_check.py ray-train --cpu
  step throughput 120 "$py" benchmarks/throughput.py --small --device cpu
  step peak-memory 120 "$py" benchmarks/throughput.py --small --device cpu --batch-size 4 --steps 1
  step predicted 120 "$py" benchmarks/memory.py --small --variant paper --json "$out/predicted.json"
  step attention-sdpa 60 "$py" benchmarks/focus_attention.py --device cpu --batch 2 --speech-frames 40 \
    --text-tokens 8 --repeats 2 --warmup 1
  skip attention-flex "flex_attention has no backward on the CPU"
  device=cpu
else
  step ray-train 120 "$py" benchmarks/gpu_check.py ray-train
  step throughput 150 "$py" benchmarks/throughput.py
  step peak-memory 150 "$py" benchmarks/throughput.py --batch-size 32 --audio-seconds 15 --steps 3 --warmup 1
  step predicted 150 "$py" benchmarks/memory.py --variant paper --seconds 15.5 --tokens 64 \
    --json "$out/predicted.json"
  step attention-sdpa 90 "$py" benchmarks/focus_attention.py --device cuda --attn-implementation sdpa
  step attention-flex 120 "$py" benchmarks/focus_attention.py --device cuda --attn-implementation flex_attention
  device=cuda
fi
work="$out/cache-data"
step cache 150 bash -c "set -e
  '$py' -m ser_platform.cli synth '$work/corpus' --utterances-per-session 8 --overwrite
  '$py' -m ser_platform.cli prepare --source '$work/corpus' --out '$work/parquet' --overwrite > /dev/null
  '$py' -m ser_platform.cli cache --dataset '$work/parquet' --device $device"
"$py" benchmarks/gpu_check.py report "$out"
