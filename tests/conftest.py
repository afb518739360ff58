import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import kvloom

# Deterministic, bounded property tests; KVLOOM_HYPOTHESIS_PROFILE=thorough for more cases.
settings.register_profile("default", derandomize=True, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=400,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("KVLOOM_HYPOTHESIS_PROFILE", "default"))

# Tolerances of kernel output vs the float64 reference computed on the same (already
# rounded) inputs: fp32 accumulation, then rounding of the output to its dtype.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(params=["auto", "avx2", "generic"])
def isa(request):
    """Runs a test on the run-time-selected kernels (AVX-512 where the CPU has it), on the AVX2
    ones and on the portable ones."""
    kvloom._core.force_isa(request.param)
    yield request.param
    kvloom._core.force_isa("auto")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long fuzzing runs (state machine: 2,000 examples; snapshot mutations: 100,000)")


@pytest.fixture
def long_run(request) -> bool:
    return bool(request.config.getoption("--long"))
