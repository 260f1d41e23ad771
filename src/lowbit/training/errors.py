"""The error of the training layer."""

from __future__ import annotations

from lowbit.errors import LowbitError


class TrainingError(LowbitError, ValueError):
    """Training cannot go on as asked (NaN loss, a checkpoint that does not match, a bad
    option); the message says what happened and how to go on."""
