"""Tests for lowbit.data.corpus (tiny BPE tokenizer from conftest, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.data import (
    CALIBRATION_OFFSET,
    CorpusError,
    TextCalibration,
    corpus_text,
    pydoc_text,
    text,
    tokens,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_pydoc_text_is_built_exactly() -> None:
    from pydoc_data.topics import topics

    expect = "\n\n".join(topics[k].strip() for k in sorted(topics))
    assert pydoc_text() == expect
    assert corpus_text("pydoc") == expect
    assert corpus_text() == expect


def test_corpus_text_file_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert corpus_text(f) == "héllo wörld\n"
    assert corpus_text(str(f)) == "héllo wörld\n"
    with pytest.raises(CorpusError, match="neither a built-in text .*pydoc.* nor an existing file"):
        corpus_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        corpus_text(bad)


def test_tokens_slice_no_special_tokens_and_cached(tok) -> None:
    all_ids = tokens("pydoc", tok)
    assert all_ids.dtype == torch.long and all_ids.dim() == 1
    expect = tok(pydoc_text(), add_special_tokens=False).input_ids
    assert all_ids.tolist() == expect  # no BOS: the stream starts with the text itself
    part = tokens("pydoc", tok, offset=100, count=50)
    assert part.tolist() == expect[100:150]
    part[0] = -1  # callers get a copy, the cache is untouched
    assert tokens("pydoc", tok, offset=100, count=1).item() == expect[100]
    with pytest.raises(CorpusError, match="tokens"):
        tokens("pydoc", tok, offset=len(expect) - 10, count=20)


def test_tokens_file_changes_invalidate_cache(tok, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("aaaa bbbb", encoding="utf-8")
    first = tokens(f, tok).tolist()
    f.write_text("completely different and longer text", encoding="utf-8")
    assert tokens(f, tok).tolist() != first


def test_text_batches_shape_and_offset(tok) -> None:
    batches = text("pydoc", tok, tokens=4096, seq_len=256, offset=CALIBRATION_OFFSET,
                   batch_size=3)
    assert [tuple(b.shape) for b in batches] == [(3, 256)] * 5 + [(1, 256)]
    flat = torch.cat([b.reshape(-1) for b in batches])
    expect = tokens("pydoc", tok, offset=CALIBRATION_OFFSET, count=4096)
    assert torch.equal(flat, expect)


def test_text_without_tokenizer_is_lazy(tok) -> None:
    lazy = text("pydoc", tokens=1024, seq_len=512)
    assert isinstance(lazy, TextCalibration)
    got = lazy.batches(tok)
    assert len(got) == 2 and got[0].shape == (1, 512)


def test_text_too_short(tok, tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("just a few words", encoding="utf-8")
    with pytest.raises(CorpusError, match="fewer than one window"):
        text(f, tok, tokens=512, seq_len=512, offset=0)
    with pytest.warns(UserWarning, match=r"using \d+ windows of 4 instead of 16"):
        got = text(f, tok, tokens=64, seq_len=4, offset=0)
    assert len(got) == len(tokens(f, tok)) // 4
    with pytest.raises(CorpusError, match="seq_len"):
        text("pydoc", tok, tokens=10, seq_len=512)


def test_not_a_tokenizer() -> None:
    with pytest.raises(CorpusError, match="not a tokenizer"):
        tokens("pydoc", object())
