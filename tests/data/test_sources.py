"""The built-in named texts: the default calibration mix and the held-out evaluation texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.data import HELD_OUT, MIX, CorpusError, corpus_text, sources, text, tokens


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_default_mix_takes_one_window_of_each_kind_in_turn(tok) -> None:
    seq = 64
    got = [b[0] for b in text("default", tok, tokens=6 * seq, seq_len=seq)]
    assert MIX == ("pydoc", "docstrings", "stdlib-code") and len(got) == 6
    for i, window in enumerate(got):
        name = MIX[i % 3]
        start = (20000 if name == "pydoc" else 0) + (i // 3) * seq
        assert window.tolist() == tokens(name, tok, offset=start, count=seq).tolist(), i
    assert text(tokens=6 * seq, seq_len=seq).source == "default"  # the default text


def test_sources_are_deterministic_and_distinct() -> None:
    code, docs = sources.stdlib_code(), sources.stdlib_docstrings()
    assert len(code) >= 400_000 and len(docs) >= 400_000
    sources.stdlib_code.cache_clear()
    assert sources.stdlib_code() == code
    assert "def " in code and code[:2000] != docs[:2000]


def test_calibration_never_reads_the_held_out_or_evaluation_text() -> None:
    root = sources.stdlib_dir()
    parts = {p.relative_to(root).parts[0] for p in sources._ordered_py_files()}
    assert not parts & {"email", "idlelib", "test", "pydoc_data"}
    calib = sources.stdlib_code() + sources.stdlib_docstrings()
    for name in HELD_OUT:
        held = corpus_text(name)
        lines = [ln for ln in held.splitlines() if len(ln) > 50][:200]
        assert lines and sum(ln in calib for ln in lines) <= 2, name
    # pydoc's evaluation windows (its first topics) are not in the mix's other sources
    evaluated = [ln for ln in corpus_text("pydoc")[:20000].splitlines() if len(ln) > 50]
    assert sum(ln in calib for ln in evaluated) <= 2


def test_held_out_texts_by_name(tok) -> None:
    for name in HELD_OUT:
        ids = tokens(name, tok)
        assert len(ids) > 8192, name
        assert tokens(name, tok, count=100).tolist() == ids[:100].tolist()


def test_missing_sources_name_the_fix(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "stdlib_dir", lambda: tmp_path)
    with pytest.raises(CorpusError, match="libpython3.11-testsuite"):
        corpus_text("email")
    with pytest.raises(CorpusError, match="idle-python3.11"):
        corpus_text("idle-news")
    sources.stdlib_code.cache_clear()
    try:
        with pytest.raises(CorpusError, match="--calibration FILE"):
            sources.stdlib_code()
    finally:
        sources.stdlib_code.cache_clear()


def test_default_is_a_mix_not_one_text() -> None:
    with pytest.raises(CorpusError, match="mix of token windows"):
        corpus_text("default")
    with pytest.raises(CorpusError, match="nor an existing file"):
        corpus_text("no-such-text")
