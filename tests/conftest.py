"""Shared test set-up: Triton interpreter on CPU (set before triton is imported), fla shims, Hypothesis profiles."""

import os

import pytest

if not os.environ.get("NATSL_TEST_DEVICE", "").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from interpreter_shims import apply_interpreter_shims  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    apply_interpreter_shims()

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=8, derandomize=True, deadline=None, suppress_health_check=_SUPPRESS,
                          print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_SUPPRESS)
settings.register_profile("nightly", max_examples=300, deadline=None, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DEVICE = os.environ.get("NATSL_TEST_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE

