#!/usr/bin/env bash
# Measures DeepSeek-V2-Lite and Qwen3-30B-A3B expert shapes on CUDA and writes the profiles to $OUT.
#
# Run from the repository root on a machine with an NVIDIA GPU (torch with CUDA, plus this
# package's dependencies; the package itself need not be installed):
#     OUT=/tmp/gpu-profiles bash benchmarks/gpu_profile.sh
# Writes, per model: $OUT/measured-<gpu>.<model>.yaml (the profile), .png (the plot, when matplotlib
# is installed), profile.<model>.txt (the report) and bench_profile.<model>.txt (the benchmark:
# fitted-model error on fresh counts, one-expert vs peak pinned bandwidth).
# Expected time: about 2 minutes per profile and 1 per benchmark; each step is capped at 5 minutes.
set -euo pipefail

OUT="${OUT:?set OUT to the directory the profiles go to}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_profile.sh: torch sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"{torch.get_num_threads()} CPU threads")
PY

gpu=$("$PYTHON" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')

for preset in deepseek-v2-lite qwen3-30b-a3b; do
  name="measured-$gpu.$preset"
  timeout 300 "$PYTHON" -c 'from hybrimoe.cli import main; main()' profile \
    --preset "$preset" --device cuda --name "$name" \
    --out "$OUT/$name.yaml" --force --plot "$OUT/$name.png" \
    --note "Measured by benchmarks/gpu_profile.sh." \
    | tee "$OUT/profile.$preset.txt"
  timeout 300 "$PYTHON" benchmarks/bench_profile.py --preset "$preset" --device cuda \
    | tee "$OUT/bench_profile.$preset.txt"
done
ls -l "$OUT"
