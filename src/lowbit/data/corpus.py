"""Built-in texts (CPython's ``pydoc_data.topics``, the named texts of ``sources``, the
``"default"`` calibration mix) and user text files, tokenized.

Tokenization convention: the whole text is encoded once with ``add_special_tokens=False``, so
no BOS/EOS/CLS/SEP token is added anywhere; windows are plain slices of that token stream.
This matches SmolLM2 (its tokenizer adds no BOS either: ``add_bos_token`` is false in the
GGUF and in the Hugging Face tokenizer) and ``llama-perplexity`` on such models. Evaluation
uses tokens 0..16383 of the pydoc stream; calibration reads pydoc from token 20000 onward,
so the two never overlap. The default calibration text is ``"default"``: windows drawn in
turn from pydoc (past 20000), standard-library docstrings and standard-library code
(``sources.MIX``); ``sources.HELD_OUT`` names texts calibration never sees.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.data.sources import CorpusError  # noqa: F401  (re-exported)

__all__ = [
    "CALIBRATION_OFFSET",
    "DEFAULT_CALIBRATION",
    "CorpusError",
    "TextCalibration",
    "corpus_text",
    "pydoc_text",
    "text",
    "tokens",
]

CALIBRATION_OFFSET = 20000
"""First token of pydoc's calibration slice (evaluation uses tokens 0..16383)."""
DEFAULT_CALIBRATION = "default"
"""The calibration text the CLI and ``lowbit.data.text`` use when none is named."""


def pydoc_text() -> str:
    """CPython's pydoc topics, stripped and joined in sorted key order with one blank line.

    The text differs between Python versions; the published numbers use CPython 3.11.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _named(source: str | os.PathLike[str]) -> str | None:
    """The built-in name ``source`` stands for, or None for a file path."""
    from lowbit.data.sources import NAMED

    name = os.fspath(source)
    return name if name == "pydoc" or name in NAMED else None


def _source_key(source: str | os.PathLike[str]) -> tuple[Any, ...]:
    if _named(source):
        return (os.fspath(source),)
    path = Path(source).expanduser().resolve()
    try:
        st = path.stat()
    except OSError:
        return ("file", str(path))
    return ("file", str(path), st.st_size, st.st_mtime_ns)


def corpus_text(source: str | os.PathLike[str] = "pydoc") -> str:
    """The text of ``source``: ``"pydoc"``, a name in ``sources.NAMED`` or a UTF-8 file path.

    ``"default"`` is a mix of windows, not one text: its token stream comes from ``tokens``.
    """
    from lowbit.data.sources import NAMED, named_text

    name = _named(source)
    if name == "pydoc":
        return pydoc_text()
    if name == "default":
        raise CorpusError("'default' is a mix of token windows, not one text: use "
                          "lowbit.data.tokens('default', tokenizer) or text('default', ...)")
    if name is not None:
        return named_text(name)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusError(
            f"text source {os.fspath(source)!r} is neither a built-in text "
            f"({', '.join(NAMED)}) nor an existing file; pass one of those "
            "names or the path to a UTF-8 text file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not valid UTF-8 ({exc}); re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`."
        ) from exc


# tokenizer -> {source key -> token tensor}; weak so a dropped tokenizer frees its cache.
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _encode(tokenizer: Any, text_: str) -> list[int]:
    """Encode without special tokens; works for transformers and raw ``tokenizers`` objects."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast HF tokenizer: skip the max-length warning and Python overhead
        return backend.encode(text_, add_special_tokens=False).ids
    out = tokenizer.encode(text_, add_special_tokens=False)
    return list(out.ids if hasattr(out, "ids") else out)


def _all_tokens(source: str | os.PathLike[str], tokenizer: Any) -> torch.Tensor:
    key = _source_key(source)
    try:
        per_tok = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable / not hashable: no caching
        per_tok = {}
    if key not in per_tok:
        if key == ("default",):
            per_tok[key] = _mix(tokenizer, 512, None).flatten()
        else:
            ids = _encode(tokenizer, corpus_text(source))
            per_tok[key] = torch.tensor(ids, dtype=torch.long)
    return per_tok[key]


def _mix(tokenizer: Any, seq_len: int, n_windows: int | None) -> torch.Tensor:
    """``(n, seq_len)`` windows of the ``"default"`` mix: window ``i`` is the ``i // k``-th
    window of source ``i % k`` (``sources.MIX``, pydoc from ``CALIBRATION_OFFSET``), so any
    prefix holds every kind of text in equal shares. ``None``: as many as every source has."""
    from lowbit.data.sources import MIX

    per = []
    for name in MIX:
        ids = _all_tokens(name, tokenizer)[CALIBRATION_OFFSET if name == "pydoc" else 0:]
        per.append(ids[: len(ids) // seq_len * seq_len].view(-1, seq_len))
    rounds = min(len(w) for w in per)
    stacked = torch.stack([w[:rounds] for w in per], 1).reshape(-1, seq_len)
    return stacked if n_windows is None else stacked[:n_windows]


def _resolve_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer, or a model spec / loaded model whose tokenizer lowbit can load."""
    if tokenizer is None:
        raise CorpusError("a tokenizer is needed: pass tokenizer=lowbit.load_tokenizer(spec)")
    if isinstance(tokenizer, (str, os.PathLike, torch.nn.Module)):
        from lowbit.model.loaders import load_tokenizer

        return load_tokenizer(tokenizer)
    if not hasattr(tokenizer, "encode"):
        raise CorpusError(f"{type(tokenizer).__name__} is not a tokenizer (it has no encode())")
    return tokenizer


def tokens(
    source: str | os.PathLike[str],
    tokenizer: Any,
    *,
    offset: int = 0,
    count: int | None = None,
) -> torch.Tensor:
    """Token ids ``[offset, offset+count)`` of ``source`` as a 1-D ``torch.long`` tensor.

    ``tokenizer`` is a Hugging Face tokenizer (or a model spec / model loaded by lowbit). The
    whole text is tokenized once per (source, tokenizer) and cached in the process; no special
    tokens are added. Raises ``CorpusError`` if fewer than ``count`` tokens are available.
    """
    if offset < 0 or (count is not None and count < 0):
        raise CorpusError(f"offset and count must be >= 0, got offset={offset}, count={count}")
    ids = _all_tokens(source, _resolve_tokenizer(tokenizer))
    end = len(ids) if count is None else offset + count
    if end > len(ids) or offset > len(ids):
        raise CorpusError(
            f"{os.fspath(source)!r} has {len(ids)} tokens, but tokens {offset}..{end - 1} were "
            "asked for; lower offset/count or pass a longer text file."
        )
    return ids[offset:end].clone()


@dataclass(frozen=True)
class TextCalibration:
    """A calibration request not yet tied to a tokenizer (``text(...)`` without a tokenizer).

    ``batches(tokenizer)`` turns it into the list of ``(batch_size, seq_len)`` tensors; code
    that holds the model can call it with the model's tokenizer.
    """

    source: str
    tokens: int = 65536
    seq_len: int = 512
    offset: int | None = None
    batch_size: int = 1

    def batches(self, tokenizer: Any) -> list[torch.Tensor]:
        """Tokenize and cut into batches (see ``text``); ``tokenizer`` may be the model."""
        return text(self.source, tokenizer, tokens=self.tokens, seq_len=self.seq_len,
                    offset=self.offset, batch_size=self.batch_size)


def _plain(source: str, tokenizer: Any, tokens_: int, seq_len: int) -> list[torch.Tensor]:
    """One plain source's windows, for a mix (``calibration_mix.Reader``)."""
    return text(source, tokenizer, tokens=tokens_, seq_len=seq_len)


def text(
    source: str | os.PathLike[str] = DEFAULT_CALIBRATION,
    tokenizer: Any = None,
    *,
    tokens: int = 65536,
    seq_len: int = 512,
    offset: int | None = None,
    batch_size: int = 1,
    model: torch.nn.Module | None = None,
) -> list[torch.Tensor] | TextCalibration:
    """Calibration batches: ``tokens // seq_len`` windows of ``seq_len`` tokens from ``offset``.

    ``source``: ``"default"`` (the mix of pydoc, docstrings and code, one window of each in
    turn; ``sources.MIX``), ``"pydoc"``, another name of ``sources.NAMED`` or a file path.
    ``offset=None``: ``CALIBRATION_OFFSET`` for pydoc (past its evaluation windows), 0 for
    the mix (which already starts pydoc there), the other named texts and files (a user's
    calibration file is read from its start).

    Returns a list of ``torch.long`` tensors shaped ``(batch_size, seq_len)`` (the last batch
    may be smaller). With ``tokenizer=None`` a ``TextCalibration`` is returned instead, to be
    resolved later with the model's tokenizer. If the text holds fewer than ``tokens`` tokens
    after ``offset``, as many whole windows as fit are used; fewer than one is an error.

    ``source`` may also be a mix, ``default+my.txt@0.25`` (``calibration_mix``: a share of
    the windows from each added text), or ``generated`` (windows sampled from ``model``;
    a model passed as ``tokenizer`` serves too); ``offset`` does not apply to those.
    """
    from lowbit.data import calibration_mix

    if calibration_mix.is_mix_or_generated(source):
        if tokenizer is None:
            return TextCalibration(os.fspath(source), tokens, seq_len, offset, batch_size)
        if model is None and isinstance(tokenizer, torch.nn.Module):
            model = tokenizer
        return calibration_mix.mixed(os.fspath(source), _resolve_tokenizer(tokenizer), tokens,
                                     seq_len, _plain, model, batch_size)
    if offset is None:
        offset = CALIBRATION_OFFSET if _named(source) == "pydoc" else 0
    if seq_len < 2 or tokens < seq_len or batch_size < 1 or offset < 0:
        raise CorpusError(
            f"need seq_len >= 2, tokens >= seq_len, batch_size >= 1 and offset >= 0; got "
            f"seq_len={seq_len}, tokens={tokens}, batch_size={batch_size}, offset={offset}"
        )
    if tokenizer is None:
        return TextCalibration(os.fspath(source), tokens, seq_len, offset, batch_size)
    tokenizer = _resolve_tokenizer(tokenizer)
    ids = (_mix(tokenizer, seq_len, None).flatten() if _named(source) == "default"
           else _all_tokens(source, tokenizer))
    available = max(0, len(ids) - offset)
    n_windows = min(tokens, available) // seq_len
    if 1 <= n_windows < tokens // seq_len:
        warnings.warn(
            f"{os.fspath(source)!r} has only {available} tokens after offset {offset}: using "
            f"{n_windows} windows of {seq_len} instead of {tokens // seq_len}", stacklevel=2
        )
    if n_windows < 1:
        raise CorpusError(
            f"{os.fspath(source)!r} has {len(ids)} tokens, so after offset {offset} there are "
            f"{available}, fewer than one window of {seq_len}; pass a lower offset or "
            "seq_len, or a longer text file."
        )
    windows = ids[offset: offset + n_windows * seq_len].view(n_windows, seq_len)
    return [windows[i: i + batch_size].clone() for i in range(0, n_windows, batch_size)]
