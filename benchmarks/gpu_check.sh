#!/usr/bin/env bash
# The runtime on CUDA: the exactness tests with the CUDA backend, then decode tokens/s for a random
# model with DeepSeek-V2-Lite's shapes at cache ratios 0.25, 0.5, 1.0 against all experts on the CPU.
#
# Run from the repository root on a machine with an NVIDIA GPU (torch with CUDA, plus this
# package's dependencies; the package itself need not be installed) and about 40 GB of free RAM:
#     OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
# Writes to $OUT: cuda_tests.txt (pytest), profile.yaml and profile.txt (a quick measured profile
# for the model's expert shape, used for planning; the built-in estimate if profiling fails),
# gpu_decode.txt and gpu_decode.json (the decode table).
# Expected time: about 1 minute of tests, 1 of profiling, 4 of decoding; each step is capped.
set -uo pipefail

OUT="${OUT:?set OUT to the directory the results go to}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
status=0

"$PYTHON" - <<'PY' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"{torch.get_num_threads()} CPU threads")
PY

timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/runtime/test_cuda.py 2>&1 \
  | tee "$OUT/cuda_tests.txt" || status=1

profile_args=()
if timeout 150 "$PYTHON" -c 'from hybrimoe.cli import main; main()' profile \
     --preset deepseek-v2-lite --device cuda --quick --name gpu-check.deepseek-v2-lite \
     --out "$OUT/profile.yaml" --force > "$OUT/profile.txt" 2>&1; then
  profile_args=(--profile "$OUT/profile.yaml")
else
  echo "profiling failed (see $OUT/profile.txt): planning with the built-in estimate"
fi

timeout 420 "$PYTHON" benchmarks/gpu_decode.py ${profile_args[@]+"${profile_args[@]}"} --json "$OUT/gpu_decode.json" 2>&1 \
  | tee "$OUT/gpu_decode.txt" || status=1

ls -l "$OUT"
exit $status
