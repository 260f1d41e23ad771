"""Tests for lowbit.eval.model_info: the model facts evaluate and evaluate_embeddings share."""

import pytest
import torch

from lowbit.eval import kernels_of as exported
from lowbit.eval.model_info import kernels_of, tokenizer_for


def test_kernels_of_counts_float_linears() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert kernels_of(model) == {"F.linear (float32)": 2}
    assert exported is kernels_of


def test_tokenizer_for_needs_a_tokenizer_or_a_spec() -> None:
    tok = object()
    assert tokenizer_for(torch.nn.Linear(2, 2), tok) is tok
    with pytest.raises(ValueError, match="pass tokenizer"):
        tokenizer_for(torch.nn.Linear(2, 2), None)
