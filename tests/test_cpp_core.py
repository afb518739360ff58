"""The C++ core on its own: its unit tests built with AddressSanitizer + UndefinedBehaviorSanitizer
(CMake option KVLOOM_SANITIZE), again with ThreadSanitizer (KVLOOM_TSAN) for the concurrent
appends, forks and the thread pool, both with the CUDA backend on the host simulator
(KVLOOM_CUDA_SIM: the CUDA tests run there without a GPU), and, where nvcc is installed, with
the real CUDA target (its test skips itself without a GPU); run through ctest.

The same builds are installed (``cmake --install``) into temporary prefixes, and the two
programs in ``examples/cpp`` and ``examples/c`` are built out of tree against the *installed*
package (``find_package(kvloom)``), run, and checked against the Python API on the same inputs
— under the sanitizer build too.

Needs cmake and a C++ compiler (the `test` extra installs cmake and ninja). Set
KVLOOM_SKIP_CPP_TESTS=1 to skip, e.g. when testing an installed wheel without sources.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvloom

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(os.environ.get("KVLOOM_SKIP_CPP_TESTS") == "1", reason="KVLOOM_SKIP_CPP_TESTS=1"),
              pytest.mark.slow]

# The sanitizer builds carry the CUDA backend compiled against the host simulator (cuda/sim):
# its kernels run on threads, so a missing barrier is a data race TSan reports and an
# out-of-bounds read one ASan reports, with no GPU.
FLAGS = {"tsan": ["-DKVLOOM_TSAN=ON", "-DKVLOOM_CUDA_SIM=ON", "-DCMAKE_BUILD_TYPE=Debug"],
         "asan+ubsan": ["-DKVLOOM_SANITIZE=ON", "-DKVLOOM_CUDA_SIM=ON", "-DCMAKE_BUILD_TYPE=Debug"],
         # the CUDA target and its test (which skips itself without a device), optimised
         "cuda": ["-DKVLOOM_CUDA=1", "-DCMAKE_BUILD_TYPE=Release"],
         "release": ["-DKVLOOM_CUDA=0", "-DCMAKE_BUILD_TYPE=Release"]}
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")


def _tool(name):
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def _has_nvcc():
    return bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def _run(cmd, cwd):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


def _generator():
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"] if _tool("ninja") else []


_BUILDS = {}


def _build(kind, tmp_path_factory):
    """Configures and builds the core and its unit tests once per session; installs it."""
    if kind in _BUILDS:
        return _BUILDS[kind]
    cmake = _tool("cmake")
    assert cmake, "cmake not found: install the test extra (pip install '.[test]')"
    assert (ROOT / "CMakeLists.txt").exists(), "run the tests from a source checkout"
    if kind == "cuda" and not _has_nvcc():
        pytest.skip("nvcc not found: the CUDA build of the C++ tests is skipped")
    build = tmp_path_factory.mktemp("cpp-" + kind.replace("+", "-"))
    prefix = build / "prefix"
    _run([cmake, "-S", ROOT, "-B", build, "-DKVLOOM_BUILD_TESTS=ON", *FLAGS[kind], *_generator()], build)
    _run([cmake, "--build", build, "-j", str(os.cpu_count() or 2)], build)
    _run([cmake, "--install", build, "--prefix", prefix, "--component", "dev"], build)
    _BUILDS[kind] = (build, prefix)
    return _BUILDS[kind]


@pytest.mark.parametrize("kind", ["asan+ubsan", "tsan", "cuda"])
def test_cpp_unit_tests_under_sanitizers(tmp_path_factory, kind):
    build, _ = _build(kind, tmp_path_factory)
    r = _run([_tool("ctest") or "ctest", "--output-on-failure", "-V"], build)
    assert "0 failed" in r.stdout and "runtime error" not in r.stdout + r.stderr
    assert "ThreadSanitizer" not in r.stdout + r.stderr
    if kind != "cuda":  # the simulated device is always there: the CUDA tests ran, none skipped
        assert "PASS cuda_decode_attention_matches_host" in r.stdout and "no CUDA device" not in r.stdout


def _python_reference():
    """What both example programs compute, through the Python API (same formulas, fp32)."""
    L, H, Hq, D, T = 2, 2, 4, 16, 20
    cache = kvloom.KVCache(L, H, D, block_size=4, policy=kvloom.Window(sinks=2, recent=6))
    s = cache.add_sequence()
    t = torch.arange(T, dtype=torch.float64)[None, :, None]
    d = torch.arange(D, dtype=torch.float64)[None, None, :]
    h = torch.arange(H, dtype=torch.float64)[:, None, None]
    for layer in range(L):
        k = torch.sin(0.1 * (t + 1) + 0.37 * d + h + layer).float()
        v = torch.cos(0.05 * (t + 1) * (d + 1) - h - layer).float()
        cache.append(layer, s, k, v)
        cache.apply_policy(layer, s)
    g = torch.arange(Hq, dtype=torch.float64)[:, None]
    q = torch.sin(0.3 * g + 0.11 * torch.arange(D, dtype=torch.float64)[None, :]).float()[None]
    out = cache.attend(1, q, [s])[0].flatten().tolist()
    lengths = [cache.length(layer, head, s) for layer in range(L) for head in range(H)]
    return lengths, cache.memory_bytes(), out


def _parse(stdout):
    lines = dict(line.split(":", 1) for line in stdout.strip().splitlines() if ":" in line and not line.startswith("kvloom "))
    return ([int(x) for x in lines["lengths"].split()], int(lines["memory_bytes"]),
            [float(x) for x in lines["out"].split()], lines.get("error", "").strip())


@pytest.mark.parametrize("example", ["cpp", "c"])
@pytest.mark.parametrize("kind", ["release", "asan+ubsan"])
def test_examples_build_against_the_installed_package(tmp_path_factory, tmp_path, kind, example):
    if kind == "release" and _has_nvcc():
        kind = "cuda"  # the Release build then carries the CUDA target: its exported package is the one to test
    _, prefix = _build(kind, tmp_path_factory)
    assert (prefix / "include" / "kvloom" / "kvloom.h").exists()
    assert list(prefix.glob("lib*/cmake/kvloom/kvloomConfig.cmake"))
    out = tmp_path / "build"
    _run([_tool("cmake"), "-S", ROOT / "examples" / example, "-B", out, f"-DCMAKE_PREFIX_PATH={prefix}",
          *_generator()], tmp_path)
    _run([_tool("cmake"), "--build", out], tmp_path)
    r = _run([out / f"kvloom_{example}_example"], tmp_path)
    assert r.stdout.startswith(f"kvloom {kvloom.__version__}")
    lengths, nbytes, values, error = _parse(r.stdout)
    want_lengths, want_bytes, want_out = _python_reference()
    assert lengths == want_lengths == [8, 8, 8, 8]
    assert nbytes == want_bytes
    assert len(values) == len(want_out) and all(math.isclose(a, b, abs_tol=2e-6) for a, b in zip(values, want_out))
    if example == "c":
        assert "layer 9 out of range" in error
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr
