#!/usr/bin/env bash
# The loader's GPU check, one command on a GPU machine (about 5 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. every test parametrised on CUDA (compositor vs reference, loader vs reference, order and
#    resume on the GPU) and the CPU-vs-GPU comparison of the same batches (targets equal,
#    images within DALI's resize rounding);
# 2. the CUDA drivers against the CPU drivers bit for bit on the real device (the same cases
#    CI runs under numba's CUDA simulator);
# 3. `bench_loader.py` at 640 and 1024 on the GPU (with the CPU rows of the same run), written
#    to benchmarks/results/loader-<device>.json (and OUT_DIR if given), named by the GPU.
# Needs the project's packages plus numba (and, for CUDA 13, numba-cuda with its NVVM); on a
# machine without a registry, ../shared/tools/gpu-wheels.sh numba llvmlite prepares them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -m pytest -q -rs tests/test_compositor.py tests/test_loader.py tests/test_loader_order.py -k "cuda or agree"
python3 - <<'PY'
import json, sys
sys.path.insert(0, "tests")
from compositor_cases import differences, expected, make_case, run_compositor
verdict = {}
for blending in ("hard", "alpha", "gaussian"):
    case = make_case(11, 256, blending)
    gpu, cpu = run_compositor(case, "cuda"), run_compositor(case, "cpu")
    verdict[blending] = {"gpu_vs_cpu": differences(gpu, cpu), "gpu_vs_reference": differences(gpu, expected(case))}
print(json.dumps(verdict))
assert all(set(v.values()) == {0} for d in verdict.values() for v in d.values()), "CPU and GPU differ"
PY
python3 benchmarks/bench_loader.py --sizes 640 1024 --rounds 1 --no-previous
if [ -n "$out" ]; then mkdir -p "$out" && cp benchmarks/results/loader-*.json "$out"/; fi
