"""The tokenizer as GGUF metadata, for byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2,
Llama 3): token list and types, merges, special ids, chat template. SentencePiece tokenizers
(Llama 2, Mistral: ``tokenizer.model``) are written by ``gguf_vocab_spm``.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) from
``tokenizer.ggml.pre``; lowbit reads it off the Hugging Face ``tokenizer.json``
(``PRE_TOKENIZERS``), or takes it from the GGUF file the model came from, or from the caller.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lowbit.export.gguf_weights import TokenizerExportError

__all__ = ["TokenizerExportError", "add_tokenizer", "pre_tokenizer_name"]

#: llama.cpp pre-tokenizer names for the byte-level BPE splits lowbit recognises
PRE_TOKENIZERS = {
    "bytelevel": "gpt-2",  # ByteLevel(use_regex=True): the GPT-2 regex
    "digits+bytelevel": "smollm",  # single digits, then the GPT-2 regex (SmolLM, SmolLM2)
    "qwen2": "qwen2",
    "llama3": "llama-bpe",
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return PRE_TOKENIZERS["bytelevel"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return PRE_TOKENIZERS["digits+bytelevel"]
    if kinds == ["Split", "ByteLevel"]:
        regex = str(steps[0].get("pattern", {}).get("Regex", ""))
        if r"\p{N}{1,3}" in regex:
            return PRE_TOKENIZERS["llama3"]
        if r"\p{N}" in regex:
            return PRE_TOKENIZERS["qwen2"]
    raise TokenizerExportError(
        f"lowbit does not recognise this tokenizer's pre-tokenizer ({kinds}); pass llama.cpp's "
        f"name for it: export(..., tokenizer_pre=NAME) (CLI: --tokenizer-pre NAME), e.g. "
        f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}")


def source_pre_tokenizer(spec: str | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF file the model came from (bundled or a path)."""
    if not spec or spec.startswith("<"):
        return None
    from lowbit.model.hub import BUNDLED, bundled_path

    if spec in BUNDLED:
        if BUNDLED[spec].kind != "gguf":
            return None
        path = bundled_path(spec)
    elif spec.endswith(".gguf") and Path(spec).is_file():
        path = Path(spec)
    else:
        return None
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> str:
    """Write ``tokenizer`` (a Hugging Face tokenizer: byte-level BPE, or SentencePiece with
    its ``tokenizer.model``) into ``writer``; returns the pre-tokenizer name used."""
    from gguf import SpecialVocab, TokenType

    from lowbit.export.gguf_vocab_spm import add_spm_tokenizer, spm_model_file

    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        model = data.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            spm = spm_model_file(tokenizer, Path(tmp))
            if spm is not None:
                return add_spm_tokenizer(writer, tokenizer, spm, Path(tmp), vocab_size)
            if not data:
                raise TokenizerExportError(
                    "the tokenizer has neither tokenizer.json nor tokenizer.model (a slow "
                    "tokenizer); load the model's fast tokenizer and export again")
            kind = model.get("type")
            if model.get("byte_fallback") or kind == "Unigram":
                raise TokenizerExportError(
                    f"this is a SentencePiece-style tokenizer ({kind}"
                    f"{' with byte fallback' if model.get('byte_fallback') else ''}) but its "
                    "tokenizer.model is not available (a fast tokenizer loaded from "
                    "tokenizer.json alone); put the model's tokenizer.model next to "
                    "tokenizer.json, load the tokenizer from that folder and export again")
            raise TokenizerExportError(
                f"only byte-level BPE (GPT-2 style) and SentencePiece (tokenizer.model) "
                f"tokenizers export to GGUF, this one is {kind}; convert the model with "
                "llama.cpp's convert_hf_to_gguf.py instead")
        pre = pre or pre_tokenizer_name(data)
        vocab = tokenizer.get_vocab()
        if len(vocab) > vocab_size:
            raise TokenizerExportError(f"the tokenizer has {len(vocab)} tokens but the model's "
                                       f"embedding only {vocab_size}; they do not belong together")
        by_id = {i: t for t, i in vocab.items()}
        added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
        tokens, types = [], []
        for i in range(vocab_size):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
            elif token in added:
                tokens.append(token)
                types.append(TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)
            else:
                tokens.append(token)
                types.append(TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        bos = tokenizer.bos_token_id
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bos is not None and bool(ids) and ids[0] == bos
        special.add_to_gguf(writer, quiet=True)
    return pre
