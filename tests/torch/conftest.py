"""Deterministic, single-threaded torch for the backend's tests (two shared cores)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer CPU tests (still run in CI)")


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == before, "a test leaked a default-dtype change"
