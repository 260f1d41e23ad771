"""Kernel tests: seeded, and on 2 threads like the benchmarks."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)
