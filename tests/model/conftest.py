"""Fixtures shared by the model-layer tests: a tiny random Llama and 4 x 64 calibration
tokens (no downloads)."""

import pytest
import torch

from .tiny import tiny_llama


@pytest.fixture(scope="module")
def base():
    return tiny_llama(hidden=64)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 64), generator=g) for _ in range(4)]  # 256 tokens
