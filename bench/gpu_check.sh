#!/usr/bin/env bash
# The prepared GPU check (issue 14): on a GPU machine with CUDA 13 nvcc, PyTorch (CUDA build),
# transformers, pybind11, scikit-build-core, cmake, ninja, pytest and hypothesis installed and
# no network, from the repository root:
#
#     OUT=/some/folder bash bench/gpu_check.sh
#
# It builds kvloom for one architecture (KVLOOM_GPU_ARCH, default 90), runs the C++ CUDA tests,
# the same tests under compute-sanitizer (memcheck and racecheck), the Python CUDA tests, and
# the GPU benchmark, and writes everything under $OUT (summary.md first). It keeps to a time
# budget (KVLOOM_GPU_BUDGET seconds, default 450): optional steps are skipped, and say so, when
# the budget runs short. Optional: KVLOOM_GPU_ASSETS, a folder with SmolLM2's tokenizer files
# for the Hogwild!/CIFLEX GPU test (make one with:
#   python -c "import shutil,kvloom.models as m; d=m.ensure_default_model(); [shutil.copy(p,'gpu-assets') for p in d.glob('*token*')]"
# after mkdir gpu-assets).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
ARCH=${KVLOOM_GPU_ARCH:-90}
BUDGET=${KVLOOM_GPU_BUDGET:-450}
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
step() {  # step NAME LIMIT_SECONDS COMMAND... : runs it (output to $OUT/NAME.txt), records status and time
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt 20 ]; then
    echo "| $name | skipped: time budget spent | |" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  echo "| $name | $status | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
  return 0
}

{
  echo "# kvloom GPU check"
  echo
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  python -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
} >> "$SUMMARY"

export KVLOOM_CUDA=1
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# 1. the C++ core with the CUDA backend and its unit tests, then the Python package
step cpp_build 200 bash -c "cmake -S . -B build-gpu -G Ninja -DKVLOOM_BUILD_TESTS=ON -DKVLOOM_CUDA=1 \
  -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DCMAKE_BUILD_TYPE=RelWithDebInfo && cmake --build build-gpu -j"
# KVLOOM_VERIFY_DEVICE_TABLES=1: every upload of a device block table is read back and checked
# against the host metadata (the tests only; it synchronises, so never in the benchmark)
step cpp_tests 60 env KVLOOM_VERIFY_DEVICE_TABLES=1 ./build-gpu/kvloom_core_tests
step pip_install 240 env CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" pip install --no-build-isolation --no-deps -v .
step kvloom_info 30 python -m kvloom info
# 2. compute-sanitizer over the CUDA tests
step memcheck 120 env KVLOOM_VERIFY_DEVICE_TABLES=1 "$SAN" --tool memcheck --error-exitcode 9 --leak-check full ./build-gpu/kvloom_core_tests cuda
# 3. the Python CUDA tests (and the policy suite, on the CPU of the GPU machine)
step pytest_cuda 240 env KVLOOM_VERIFY_DEVICE_TABLES=1 python -m pytest tests/test_cuda.py -q -p no:cacheprovider -x --junitxml="$OUT/pytest_cuda.xml"
# 4. the GPU benchmark (kernel rows first; end to end after)
step bench_gpu 240 python -m kvloom bench gpu --out "$OUT"
step racecheck 90 "$SAN" --tool racecheck --error-exitcode 9 ./build-gpu/kvloom_core_tests cuda

echo >> "$SUMMARY"
echo "total: $(elapsed) s of a $BUDGET s budget" >> "$SUMMARY"
[ -f "$OUT/gpu.md" ] && { echo; cat "$OUT/gpu.md"; } >> "$SUMMARY"
cat "$SUMMARY"
