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
#   python -c "import shutil,kvloom.models as m; d=m.ensure_default_model(); [shutil.copy(p,'gpu-assets') for p in [*d.glob('*token*'), *d.glob('chat_template*')]]"
# after mkdir gpu-assets: the tokenizer and its chat template).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
ARCH=${KVLOOM_GPU_ARCH:-90}
BUDGET=${KVLOOM_GPU_BUDGET:-450}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# Step logs go to $OUT/logs and are packed into $OUT/logs.tar.gz at the end: the device tool
# returns at most 8 files, so $OUT ends with summary.md, gpu.json, gpu.md and logs.tar.gz.
LOGS="$OUT/logs"
mkdir -p "$LOGS"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
step() {  # step NAME LIMIT_SECONDS COMMAND... : runs it (output to $LOGS/NAME.txt), records status and time
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt 20 ]; then
    echo "| $name | skipped: time budget spent | |" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  echo "| $name | $status | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
  # a failed step's last lines go into the summary (the tool shows the summary's tail)
  if [ $rc -ne 0 ]; then
    { echo; echo "<details><summary>$name: last lines</summary>"; echo; echo '```'
      tail -n 25 "$LOGS/$name.txt" | cut -c1-300; echo '```'; echo "</details>"; echo; } >> "$OUT/failures.md"
  fi
  return 0
}

{
  echo "# kvloom GPU check"
  echo
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  $PY -c "import sys, torch, transformers; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1); c++: $(c++ --version 2>/dev/null | head -1)"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
} >> "$SUMMARY"

export KVLOOM_CUDA=1
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# 1. the Python package and (at the same time) the C++ core with the CUDA backend and its unit tests
step pip_install 240 env CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" $PY -m pip install --no-build-isolation --no-deps -v . &
PIP=$!
step cpp_build 200 bash -c "cmake -S . -B build-gpu -G Ninja -DKVLOOM_BUILD_TESTS=ON -DKVLOOM_CUDA=1 \
  -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DCMAKE_BUILD_TYPE=RelWithDebInfo && cmake --build build-gpu -j"
# KVLOOM_VERIFY_DEVICE_TABLES=1: every upload of a device block table is read back and checked
# against the host metadata (the tests only; it synchronises, so never in the benchmark)
step cpp_tests 60 env KVLOOM_VERIFY_DEVICE_TABLES=1 ./build-gpu/kvloom_core_tests
wait $PIP
step kvloom_info 30 $PY -m kvloom info
# 2. the Python CUDA tests, with compute-sanitizer (memcheck, then racecheck) over the C++ CUDA
#    tests beside them: both only check correctness, so they may share the GPU
( step memcheck 150 env KVLOOM_VERIFY_DEVICE_TABLES=1 "$SAN" --tool memcheck --error-exitcode 9 --leak-check full ./build-gpu/kvloom_core_tests cuda
  step racecheck 100 "$SAN" --tool racecheck --error-exitcode 9 ./build-gpu/kvloom_core_tests cuda ) &
SANS=$!
step pytest_cuda 200 env KVLOOM_VERIFY_DEVICE_TABLES=1 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider --durations=15 --junitxml="$LOGS/pytest_cuda.xml"
wait $SANS
# 3. the GPU benchmark alone on the GPU (kernel rows first; end to end after)
step bench_gpu 240 $PY -m kvloom bench gpu --out "$OUT"

echo >> "$SUMMARY"
echo "total: $(elapsed) s of a $BUDGET s budget" >> "$SUMMARY"
[ -f "$OUT/gpu.md" ] && { echo; cat "$OUT/gpu.md"; } >> "$SUMMARY"
[ -f "$OUT/failures.md" ] && { echo; echo "## Failed steps"; cat "$OUT/failures.md"; } >> "$SUMMARY" && rm "$OUT/failures.md"
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
ls "$OUT"
cat "$SUMMARY"
