#!/usr/bin/env bash
# The GPU checks of graphed execution in one run (about 8 minutes on one H100/H200):
#   1. the CUDA-only tests: capture + replay equals eager for every selector, no capture errors;
#   2. the host operators per generation, eager and graphed, with real CUDA graphs;
#   3. the wall-clock benchmark, eager and graphed, SD3-medium and PixArt-Σ shapes, 28 and 50 steps,
#      batch 1 and 4, its rows also as JSON.
# Usage: bash experiments/gpu_check.sh [OUT_DIR]   (default: outputs/gpu_check)
# Needs torch with CUDA and the project's dependencies (pip install -e .); nothing is downloaded.
set -uo pipefail
out=${1:-outputs/gpu_check}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check.sh: no CUDA device here; the CPU checks are python -m pytest -q" >&2; exit 2; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" \
  | tee "$out/versions.txt"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_graphs.py -k cuda 2>&1 | tail -25 | tee "$out/cuda_tests.txt"
timeout 60 python experiments/gpu_bench.py --count-ops --steps 28 --json "$out/ops.json" 2>&1 | tee "$out/ops.txt"
timeout 400 python experiments/gpu_bench.py --graphs --repeats 2 --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
