"""Text data for evaluation and calibration: built-in texts of CPython's standard library
(``pydoc``, the ``default`` calibration mix, held-out texts; ``sources``), user files, and
windows sampled from the model itself (``generated``)."""

from lowbit.data.corpus import (
    CALIBRATION_OFFSET,
    DEFAULT_CALIBRATION,
    CorpusError,
    TextCalibration,
    corpus_text,
    pydoc_text,
    text,
    tokens,
)
from lowbit.data.sources import HELD_OUT, MIX

__all__ = [
    "CALIBRATION_OFFSET",
    "DEFAULT_CALIBRATION",
    "HELD_OUT",
    "MIX",
    "CorpusError",
    "TextCalibration",
    "corpus_text",
    "pydoc_text",
    "text",
    "tokens",
]
