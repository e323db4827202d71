"""The unit tier's own setting: one intra-op torch thread for every test.

Unit tests run tiny tensors, which gain nothing from more threads, and on a 2-core machine (CI's) spinning OpenMP
workers made the model tests several times slower. A test that measures threads sets its own and restores it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
