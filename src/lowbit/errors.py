"""The one exception family every lowbit error derives from, so the CLI can print it cleanly.

Layer errors (``FormatError`` and friends) subclass ``LowbitError`` and ``ValueError``.
"""

from __future__ import annotations


class LowbitError(Exception):
    """An error lowbit explains to its user: what went wrong and how to fix it."""
