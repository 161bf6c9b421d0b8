#!/usr/bin/env bash
# A one-shot check of the hybrid runtime on a GPU machine, over within 9 and a half minutes. Runs the steps of
# benchmarks/gpu_check.py, each under `timeout` (its budget below, then 3 s to exit):
#   env       20 s  torch, CUDA and the GPU in one line; the run stops here without a CUDA device
#   smoke     60 s  CUDA exactness, bfloat16 and quantized experts included (tests/runtime/test_cuda.py
#                   -k "bfloat16 or mixed or pinned or quantized", about 40 s)
#   profile   90 s  a quick measured profile of the key table's expert shapes (30 to 60 s), to plan
#                   with; when it fails the next steps plan with the built-in estimate
#   table    210 s  THE KEY TABLE: 12 MoE layers of Qwen3-30B-A3B experts (random weights), routing
#                   replayed from traces/qwen3-30b-a3b.npz; hybrimoe, gpu-offload, llamacpp at 25% and
#                   50% cache and cpu-only, decode (16-token prompt, 32 new tokens) and prefill (256
#                   tokens), median of 3 after a warm-up, each beside the simulator's prediction; then
#                   hybrimoe's decode speed-up over cpu-only (target >= 1.5x) and gpu-offload at 25%.
#                   Cells that would run past 190 s are skipped, marked so, and fail the step.
#   quantized 90 s  the key table's model with int4 experts (run --quantize int4), decode: hybrimoe and
#                   gpu-offload at 25% cache, hybrimoe with every expert cached, cpu-only, each beside
#                   the simulator's prediction (planned with the int4 estimate)
#   overlap   60 s  torch.profiler over 3 decode steps of hybrimoe at 25% cache (4 MoE layers): kernel
#                   time, host-to-device copy time and how much of the copying overlaps kernels
# Total: 530 s of budgets + 6 x 3 s to exit = 548 s at most.
#
# Writes to $OUT, each file as soon as its step has it (the key table after every cell):
#   env.txt; smoke.txt, smoke.json; profile.yaml, profile.txt; key_table.md, key_table.json;
#   quantized_table.md, quantized_table.json;
#   overlap.txt, overlap.json, overlap_trace.json (chrome trace: chrome://tracing or ui.perfetto.dev)
#
# Run on a machine with an NVIDIA GPU (torch with CUDA and this package's dependencies; the package
# itself need not be installed: PYTHONPATH is set to the repository root) and 32 GB of free RAM:
#     OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
# Check the script on a CPU (a scaled-down model, the CPU stand-in, a CPU test subset; under a minute):
#     OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --device cpu --small
# Exit status: 0 when every step passed; 1 when any failed or ran out of time (the others still run).
set -uo pipefail

OUT="${OUT:?set OUT to the directory the results go to}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

# step NAME SECONDS ARGS...: one step of gpu_check.py under its budget; a failure is reported and the run goes on
step() {
  local name=$1 seconds=$2
  shift 2
  echo
  echo "=== $name (budget ${seconds} s, at ${SECONDS} s)"
  timeout -k 3 "$seconds" "$PYTHON" benchmarks/gpu_check.py "$name" --out "$OUT" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "!!! $name ran out of its ${seconds} s budget"
    else
      echo "!!! $name failed (exit $rc)"
    fi
    status=1
  fi
  return "$rc"
}

step env 20 "$@" || exit 1
step smoke 60 "$@"

profile_args=()
if step profile 90 "$@"; then
  profile_args=(--profile "$OUT/profile.yaml")
else
  echo "planning with the built-in estimate"
fi

step table 210 --budget-s 190 ${profile_args[@]+"${profile_args[@]}"} "$@"
step quantized 90 --budget-s 75 "$@"
step overlap 60 ${profile_args[@]+"${profile_args[@]}"} "$@"

echo
ls -l "$OUT"
echo "gpu_check.sh: done in ${SECONDS} s, exit status $status"
exit $status
