"""What several commands share: open a model or a checkpoint folder, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def open_model(spec: str, recipe: str | None = None, calibration: str | None = None,
               progress: bool = True):
    """(model, tokenizer) for a bundled name, HF folder, GGUF file or lowbit checkpoint;
    quantized with ``recipe`` first when one is given."""
    from lowbit.model import load, load_model, load_tokenizer, quantize
    from lowbit.model.serialization import MANIFEST, read_manifest

    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).exists():
        manifest = read_manifest(path)
        model = load(path)
        tok_source = path if (path / "tokenizer_config.json").exists() else manifest["source"]
        tokenizer = load_tokenizer(str(tok_source)) if tok_source else None
    else:
        model = load_model(spec)
        tokenizer = load_tokenizer(spec)
    if recipe:
        from lowbit.model import Recipe

        r = Recipe.parse(recipe)
        calib = calibration_batches(tokenizer, calibration) if r.needs_calibration else None
        quantize(model, r, calib, progress=progress)
    return model, tokenizer


def calibration_batches(tokenizer, source: str | None, tokens: int = 16384, seq_len: int = 512):
    from lowbit.data import text

    return text(source or "pydoc", tokenizer, tokens=tokens, seq_len=seq_len)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
