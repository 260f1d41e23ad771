"""SentencePiece tokenizers (Llama 2 / Mistral style, ``tokenizer.model``) as GGUF metadata.

The layout is llama.cpp's converter's (``convert_hf_to_gguf.py``,
``_set_vocab_sentencepiece`` / ``_create_vocab_sentencepiece``): tokenizer model ``llama``,
pre-tokenizer ``default``, every SentencePiece piece with its score and type (normal,
unknown, control, unused, byte); the Hugging Face tokenizer's added tokens at score -1000
(control when special, else user-defined with ``▁`` written as a space; the model's own
``<unk>``/``<s>``/``</s>`` keep SentencePiece's types); ids up to the model's ``vocab_size``
filled with ``[PAD{i}]`` (unused, score -10000); special ids, add_bos/add_eos and the chat
template from ``tokenizer_config.json`` (``gguf.SpecialVocab``). The ``.model`` file is a
protobuf, read by ``sentencepiece``; nothing is unpickled. Settings llama.cpp's ``llama``
tokenizer does not follow (unigram models, normalization, collapsed spaces) are warned about.
"""

from __future__ import annotations

import warnings
from pathlib import Path

SPACE = "\u2581"  # SentencePiece's ▁
#: SentencePiece ``TrainerSpec.model_type`` values
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def spm_model_file(tokenizer, saved: Path) -> Path | None:
    """The SentencePiece model behind ``tokenizer``: its ``vocab_file`` (slow tokenizers, and
    fast ones loaded from a folder holding ``tokenizer.model``), else the one
    ``save_pretrained`` wrote into ``saved``."""
    for candidate in (getattr(tokenizer, "vocab_file", None), saved / "tokenizer.model"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> dict[int, int | bytes]:
    """The last value of each field of a serialized protobuf message (varints as ints,
    length-delimited fields as bytes); enough to read SentencePiece's specs without protobuf."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out[key >> 3] = value
    return out


def llama_cpp_differences(proto: bytes) -> list[str]:
    """Settings of a SentencePiece model (``ModelProto``) that llama.cpp's ``llama``
    tokenizer does not reproduce: it merges pieces by score (BPE) on the raw text."""
    model = _fields(proto)
    trainer, normalizer = _fields(model.get(2, b"")), _fields(model.get(3, b""))
    notes = []
    kind = _MODEL_TYPES.get(trainer.get(3, 1), "?")  # proto defaults: unigram, ...
    if kind != "bpe":
        notes.append(f"it is a {kind} model (llama.cpp merges pieces as BPE does)")
    if normalizer.get(2):  # a precompiled normalization rule (nmt_nfkc, ...)
        notes.append(f"it normalizes text ({normalizer.get(1, b'').decode()}; llama.cpp "
                     "does not)")
    if normalizer.get(4, 1):
        notes.append("it collapses repeated spaces (llama.cpp keeps them)")
    return notes


def add_spm_tokenizer(writer, tokenizer, model_file: Path, saved: Path,
                      vocab_size: int) -> str:
    """Write SentencePiece model ``model_file`` with ``tokenizer``'s added tokens and special
    ids into ``writer``; ``saved``: the folder ``tokenizer.save_pretrained`` wrote.
    Returns the pre-tokenizer name, ``default``."""
    from gguf import SpecialVocab, TokenType
    from sentencepiece import SentencePieceProcessor

    from lowbit.export.gguf_weights import TokenizerExportError

    try:
        sp = SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as exc:
        raise TokenizerExportError(f"{model_file} is not a SentencePiece model ({exc}); "
                                   "export with the model's own tokenizer.model") from exc
    n = sp.vocab_size()
    if max(n, len(tokenizer)) > vocab_size:
        raise TokenizerExportError(
            f"the tokenizer has {max(n, len(tokenizer))} tokens but the model's embedding only "
            f"{vocab_size}; they do not belong together")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < vocab_size}
    pieces = [sp.IdToPiece(i) for i in range(n)]
    theirs = tokenizer.convert_ids_to_tokens(list(range(n)))
    wrong = [i for i in range(n) if pieces[i] != theirs[i] and i not in added]
    if wrong:
        i = wrong[0]
        raise TokenizerExportError(
            f"{model_file} does not match the tokenizer's vocabulary ({len(wrong)} ids differ, "
            f"first {i}: {pieces[i]!r} in the .model, {theirs[i]!r} in the tokenizer); "
            "export with the tokenizer.model that belongs to this tokenizer")
    notes = llama_cpp_differences(sp.serialized_model_proto())
    if notes:
        warnings.warn(f"llama.cpp may tokenize some text differently from {model_file.name}: "
                      f"{'; '.join(notes)}", stacklevel=3)

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    for i, piece in enumerate(pieces):
        tokens[i], scores[i] = piece, sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL
                    if sp.IsControl(i) else TokenType.UNUSED if sp.IsUnused(i)
                    else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
    for i, token in sorted(added.items()):
        if i < n and token.content == pieces[i] and types[i] in (TokenType.UNKNOWN,
                                                                  TokenType.CONTROL):
            continue  # <unk>, <s>, </s>: SentencePiece's own pieces keep their type
        scores[i] = -1000.0
        if token.special:
            tokens[i], types[i] = token.content, TokenType.CONTROL
        else:
            tokens[i], types[i] = token.content.replace(SPACE, " "), TokenType.USER_DEFINED

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    writer.add_add_space_prefix(bool(first) and (first[0].startswith(SPACE)
                                                 or first[0] == "<0xE2>"))
    special = SpecialVocab(saved, n_vocab=vocab_size)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= tid < vocab_size:
            special.special_token_ids[kind] = tid
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bos is not None and len(ids) > 1 and ids[0] == bos
    special.add_special_token["eos"] = eos is not None and len(ids) > 1 and ids[-1] == eos
    special.add_to_gguf(writer, quiet=True)
    return "default"
