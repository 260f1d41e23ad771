"""Fixtures of the algorithm tests (data helpers live in ``_algo_data``)."""

import pytest
import torch

from ._algo_data import make_layer


@pytest.fixture
def layer():
    return make_layer()


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only fight over the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
