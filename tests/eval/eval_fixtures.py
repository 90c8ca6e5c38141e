"""Fixtures for the evaluation tests, imported by each test module (a conftest.py here would shadow
tests/conftest.py for ``from conftest import ...``)."""

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread():
    """Probe heads and kNN are many tiny ops: on a small shared CPU, a second thread only adds contention
    (measured 20x slower with 2 threads under load), so these tests run single-threaded (torch and BLAS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
