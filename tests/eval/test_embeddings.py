"""Tests for lowbit.eval.embeddings and evaluate()'s dispatch to it for encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit.eval.embeddings import (
    EmbeddingError,
    embed,
    evaluate_embeddings,
    is_encoder,
    nn_agreement,
    sentences,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=128)).eval()
    return model, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_sentences_are_prose_and_deterministic(tmp_path: Path) -> None:
    first = sentences("pydoc", 64)
    assert len(first) == 64 and first == sentences("pydoc", 64)
    assert all(40 <= len(s) <= 400 and "\n" not in s for s in first)
    assert len(set(first)) == 64
    short = tmp_path / "one.txt"
    short.write_text("Only one paragraph of plain prose that is long enough to count.\n")
    with pytest.raises(EmbeddingError, match="at least 2"):
        sentences(str(short))


def test_embed_ignores_padding(bert) -> None:
    model, tok = bert
    texts = ["A short sentence about lists.",
             "A much longer sentence about dictionaries, sets and the methods they share."]
    together = embed(model, tok, texts, batch_size=2)
    alone = torch.cat([embed(model, tok, [t]) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert together.shape == (2, 64)


def test_nn_agreement() -> None:
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nn_agreement(a, a) == 1.0
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert nn_agreement(a, b) == 0.0  # every neighbour changed
    c = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    assert nn_agreement(a, c) == pytest.approx(0.75)  # only the last row's neighbour moved


def test_is_encoder(bert, tiny_llama_dir: Path) -> None:
    from lowbit.model import load_model

    assert is_encoder(bert[0])
    assert not is_encoder(load_model(tiny_llama_dir))
    assert not is_encoder(torch.nn.Linear(2, 2))


def test_evaluate_dispatches_for_encoders(bert) -> None:
    from lowbit.eval import evaluate
    from lowbit.model import quantize

    model, tok = bert
    same = evaluate(model, tok, baseline=model, speed=False)
    assert same["task"] == "embeddings" and same["cosine_mean"] == pytest.approx(1.0)
    assert same["nn_agreement"] == 1.0 and "ppl" not in same
    q = quantize(copy.deepcopy(model), "w2g16", progress=False)
    res = evaluate_embeddings(q, tok, baseline=model, n_sentences=48)
    assert 0 < res["cosine_min"] <= res["cosine_mean"] < 0.9999
    assert 0 <= res["nn_agreement"] <= 1 and res["bits_per_weight"] < 5
    assert res["sentences_per_s"] > 0


def test_dimension_mismatch_is_explained(bert) -> None:
    from transformers import BertConfig, BertModel

    model, tok = bert
    other = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(EmbeddingError, match="64 and 32 dimensions"):
        evaluate_embeddings(other, tok, baseline=model, n_sentences=8, speed=False)


@pytest.mark.real_model
def test_minilm_w8_stays_close() -> None:
    from lowbit.model import load_model, load_tokenizer, quantize

    base = load_model("minilm-l6")
    tok = load_tokenizer("minilm-l6")
    q = quantize(copy.deepcopy(base), "w8", progress=False)
    res = evaluate_embeddings(q, tok, baseline=base, n_sentences=32, speed=False)
    assert res["cosine_mean"] > 0.998 and res["nn_agreement"] >= 0.9
