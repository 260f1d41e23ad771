"""Calibration mixes: ``BASE+PART@F[+PART@F...]``, a share ``F`` of the windows from each
``PART`` and the rest from ``BASE``, spread evenly.

Each source is a built-in name (``default``, ``pydoc``, ``sources.NAMED``), a UTF-8 file or
``generated`` (windows sampled from the model itself, ``lowbit.data.generated``; needs the
model). The use this is for: a user whose text is unlike the built-in mix adds a little of
it, ``default+mail.txt@0.25``, and keeps the mix's breadth. SmolLM2-135M,
``benchmarks/calibration_domains.py`` (llama.cpp-protocol KLD, 8 windows), with a quarter of
the windows from the held-out email text past its evaluation windows: email KLD 0.0665 ->
0.0406 for w4g64-gptq-rot (pydoc 0.0433 -> 0.0478) and 0.1252 -> 0.0914 for w4g128-gptq
(pydoc 0.1015 -> 0.1058); a quarter from idle-news text instead moved email only to 0.0624
and 0.1146. No change of the default mix tried came near (``lowbit.data.sources``).

Windows of each source are read in order from its start (pydoc past its evaluation windows),
so a prefix of a source always serves; window ``j`` of a source holding ``n_s`` of the ``n``
windows sits at fraction ``(j + 0.5) / n_s`` of the sequence (ties: the base first).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.data.sources import CorpusError

GENERATED = "generated"
#: ``read(source, tokenizer, tokens, seq_len)``: windows of a plain source, as batches
Reader = Callable[[str, Any, int, int], list[torch.Tensor]]


def parse(spec: str) -> tuple[str, list[tuple[str, float]]] | None:
    """``(base, [(part, fraction), ...])`` of a mix, or None for a plain source (an existing
    file whose name holds ``+`` is a plain source)."""
    if "+" not in spec or Path(spec).expanduser().is_file():
        return None
    base, *rest = spec.split("+")
    parts = []
    for item in rest:
        name, sep, frac = item.rpartition("@")
        if not sep or not name:
            raise CorpusError(f"calibration mix {spec!r}: {item!r} needs a share, e.g. "
                              f"{base or 'default'}+{item or 'my.txt'}@0.25 (a quarter of the "
                              "windows from it)")
        try:
            share = float(frac)
        except ValueError:
            share = -1.0
        if not 0 < share < 1:
            raise CorpusError(f"calibration mix {spec!r}: the share after '@' must be a "
                              f"number between 0 and 1, got {frac!r}")
        parts.append((name, share))
    if not base:
        raise CorpusError(f"calibration mix {spec!r} has no base text; write "
                          f"default+{rest[0]}")
    if sum(f for _, f in parts) >= 1:
        raise CorpusError(f"calibration mix {spec!r}: the shares add up to "
                          f"{sum(f for _, f in parts):g}; they must leave some windows to "
                          f"{base!r} (sum below 1)")
    return base, parts


def windows(source: str, tokenizer: Any, n: int, seq_len: int, read: Reader,
            model=None) -> torch.Tensor:
    """The first ``n`` calibration windows ``(n, seq_len)`` of one plain source (``read``:
    ``corpus.text``'s reader of a built-in name or file)."""
    if source == GENERATED:
        if model is None:
            raise CorpusError("'generated' calibration samples the model itself, so it needs "
                              "the model in memory: not with --stream; in Python pass "
                              "model= to lowbit.data.text")
        from lowbit.data.generated import generated_windows

        return generated_windows(model, tokenizer, n, seq_len)
    with warnings.catch_warnings():  # too short a text is an error in a mix (``mixed``)
        warnings.simplefilter("ignore")
        return torch.cat(read(source, tokenizer, n * seq_len, seq_len))


def mixed(spec: str, tokenizer: Any, tokens: int, seq_len: int, read: Reader, model=None,
          batch_size: int = 1) -> list[torch.Tensor]:
    """Calibration batches of the mix ``spec`` (``parse``; or ``generated`` alone):
    ``tokens // seq_len`` windows; ``read`` reads a plain source (``windows``)."""
    parsed = (GENERATED, []) if spec == GENERATED else parse(spec)
    if parsed is None:
        raise CorpusError(f"{spec!r} is not a calibration mix (BASE+PART@SHARE)")
    base, parts = parsed
    n = tokens // seq_len
    if n < 1:
        raise CorpusError(f"need at least one window of {seq_len} tokens, got tokens={tokens}")
    counts = [(name, round(n * share)) for name, share in parts]
    counts.insert(0, (base, n - sum(c for _, c in counts)))
    keyed = []
    for rank, (name, count) in enumerate(counts):
        if count < 1:
            raise CorpusError(f"calibration mix {spec!r}: {name!r} gets no window of the "
                              f"{n} ({tokens} tokens / {seq_len}); raise its share or "
                              "--calibration-tokens")
        got = windows(name, tokenizer, count, seq_len, read, model)
        if len(got) < count:
            raise CorpusError(f"calibration mix {spec!r}: {name!r} gave {len(got)} windows "
                              f"of {seq_len} tokens, {count} were asked for; lower the "
                              "share or --calibration-tokens, or give a longer text")
        keyed += [((j + 0.5) / count, rank, w) for j, w in enumerate(got)]
    keyed.sort(key=lambda k: (k[0], k[1]))
    out = torch.stack([w for _, _, w in keyed])
    return [out[i: i + batch_size].clone() for i in range(0, n, batch_size)]


def is_mix_or_generated(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` needs this module (a mix, or ``generated`` alone)."""
    s = os.fspath(source)
    return s == GENERATED or parse(s) is not None
