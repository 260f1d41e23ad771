"""Shared assets for the bad-input corpus (a tiny Llama folder and its lowbit checkpoint) and
the summary printed at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .corpus import TALLY


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """``tiny_llama_dir`` quantized with w8 and written by ``lowbit.save`` (with tokenizer)."""
    from lowbit import load_model, load_tokenizer, quantize, save

    model = load_model(tiny_llama_dir)
    quantize(model, "w8", progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "w8"
    save(model, out, tokenizer=load_tokenizer(tiny_llama_dir))
    return out


def pytest_terminal_summary(terminalreporter) -> None:
    if TALLY.rows:
        for line in TALLY.lines():
            terminalreporter.write_line(line)
