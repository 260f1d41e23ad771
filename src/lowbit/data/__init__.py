"""Text data for evaluation and calibration: the built-in pydoc corpus and user text files."""

from lowbit.data.corpus import (
    CALIBRATION_OFFSET,
    CorpusError,
    TextCalibration,
    corpus_text,
    pydoc_text,
    text,
    tokens,
)

__all__ = [
    "CALIBRATION_OFFSET",
    "CorpusError",
    "TextCalibration",
    "corpus_text",
    "pydoc_text",
    "text",
    "tokens",
]
