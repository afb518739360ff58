"""Builds the C++ core's own unit tests with AddressSanitizer + UndefinedBehaviorSanitizer
(CMake option KVLOOM_SANITIZE), again with ThreadSanitizer (KVLOOM_TSAN) for the
concurrent appends, forks and the thread pool, and, where nvcc is installed, with the CUDA
target (its test skips itself without a GPU); runs them through ctest.

Needs cmake and a C++ compiler (the `test` extra installs cmake and ninja). Set
KVLOOM_SKIP_CPP_TESTS=1 to skip, e.g. when testing an installed wheel without sources.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    exe = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    return exe


@pytest.mark.skipif(os.environ.get("KVLOOM_SKIP_CPP_TESTS") == "1", reason="KVLOOM_SKIP_CPP_TESTS=1")
@pytest.mark.parametrize("sanitizer", ["asan+ubsan", "tsan", "cuda"])
def test_cpp_unit_tests_under_sanitizers(tmp_path_factory, sanitizer):
    cmake = _tool("cmake")
    assert cmake, "cmake not found: install the test extra (pip install '.[test]')"
    assert (ROOT / "CMakeLists.txt").exists(), "run the tests from a source checkout"
    if sanitizer == "cuda" and not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("nvcc not found: the CUDA build of the C++ tests is skipped")
    build = tmp_path_factory.mktemp("cpp-" + sanitizer.replace("+", "-"))
    flags = {"tsan": ["-DKVLOOM_TSAN=ON", "-DKVLOOM_CUDA=0", "-DCMAKE_BUILD_TYPE=Debug"],
             "asan+ubsan": ["-DKVLOOM_SANITIZE=ON", "-DKVLOOM_CUDA=0", "-DCMAKE_BUILD_TYPE=Debug"],
             # the CUDA target and its test (which skips itself without a device), optimised
             "cuda": ["-DKVLOOM_CUDA=1", "-DCMAKE_BUILD_TYPE=Release"]}[sanitizer]
    cfg = [cmake, "-S", str(ROOT), "-B", str(build), "-DKVLOOM_BUILD_TESTS=ON", *flags]
    if _tool("ninja"):
        cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")

    def run(cmd):
        r = subprocess.run(cmd, cwd=build, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
        return r

    run(cfg)
    run([cmake, "--build", str(build), "--target", "kvloom_core_tests", "-j", str(os.cpu_count() or 2)])
    ctest = _tool("ctest") or "ctest"
    r = run([ctest, "--output-on-failure", "-V"])
    assert "0 failed" in r.stdout and "runtime error" not in r.stdout + r.stderr
    assert "ThreadSanitizer" not in r.stdout + r.stderr
