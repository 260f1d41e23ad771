"""Calibration windows sampled from the model (``lowbit.data.generated``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import CorpusError, generated
from tests.model.tiny import tiny_llama


class _Tok:
    def __init__(self, vocab=None, bos=None, eos=None):
        self.vocab, self.bos_token_id, self.eos_token_id = vocab or {}, bos, eos

    def get_vocab(self):
        return self.vocab


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=64)


@pytest.fixture
def cache_dir(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    return tmp_path / "generated"


def test_start_token_prefers_the_document_separator() -> None:
    assert generated.start_token(_Tok({"<|endoftext|>": 7}, bos=1, eos=2)) == 7
    assert generated.start_token(_Tok(bos=1, eos=2)) == 1
    assert generated.start_token(_Tok(eos=2)) == 2
    with pytest.raises(CorpusError, match="calibration text"):
        generated.start_token(_Tok())


def test_generate_is_seeded_and_shaped(model) -> None:
    a = generated.generate(model, 5, 3, 12, seed=1, batch_size=2)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == 5).all() and a.min() >= 0 and a.max() < 64
    assert torch.equal(a, generated.generate(model, 5, 3, 12, seed=1, batch_size=2))
    assert not torch.equal(a, generated.generate(model, 5, 3, 12, seed=2, batch_size=2))
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 3  # rows sample independently
    assert not model.training
    with pytest.raises(CorpusError):
        generated.generate(model, 5, 0, 12)


def test_any_count_reads_a_prefix_of_the_same_windows(model, cache_dir: Path) -> None:
    tok = _Tok(eos=3)
    five = generated.generated_windows(model, tok, 5, 10, batch_size=2, cache=False)
    three = generated.generated_windows(model, tok, 3, 10, batch_size=2, cache=False)
    assert five.shape == (5, 10) and torch.equal(three, five[:3])
    assert not cache_dir.exists()  # cache=False writes nothing


def test_cache_round_trip(model, cache_dir: Path, monkeypatch) -> None:
    tok = _Tok(eos=3)
    first = generated.generated_windows(model, tok, 3, 10, seed=4, batch_size=2)
    files = sorted(cache_dir.iterdir())
    assert len(files) == 2 and all(f.suffix == ".npy" and ".tmp" not in f.name for f in files)
    arr = np.load(files[0], allow_pickle=False)
    assert arr.dtype == np.int32 and arr.shape == (2, 10)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached windows should have been read")

    monkeypatch.setattr(generated, "generate", no_sampling)
    assert torch.equal(generated.generated_windows(model, tok, 3, 10, seed=4, batch_size=2),
                       first)
    with pytest.raises(AssertionError, match="cached"):  # another seed is another key
        generated.generated_windows(model, tok, 3, 10, seed=5, batch_size=2)


def test_model_key_follows_the_weights(model) -> None:
    other = tiny_llama(vocab=64)
    assert generated.model_key(model) == generated.model_key(other)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    assert generated.model_key(model) != generated.model_key(other)
