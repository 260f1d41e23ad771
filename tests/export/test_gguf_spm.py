"""GGUF export of SentencePiece tokenizers (Llama 2 / Mistral style ``tokenizer.model``).

A tiny BPE SentencePiece model is trained here (no network); a random Llama with its
vocabulary is exported; the metadata is read back with ``gguf.GGUFReader`` and llama.cpp's
own ``llama-tokenize`` (skipped when not built) must give the Hugging Face tokenizer's ids.
"""

from __future__ import annotations

import ast
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

import lowbit  # noqa: E402
from lowbit.export import llama_cpp_tools as tools  # noqa: E402
from lowbit.export.gguf_vocab import TokenizerExportError  # noqa: E402

SPM_SIZE, VOCAB = 380, 384  # the model's embedding is larger: 2 added tokens, 2 [PAD{i}]
SAMPLES = [
    "Hello world", "The capital of France is Paris.", "digits 1234567890 and 3.14159",
    "héllo wörld ☃ 日本語 🙂 ∑", "def f(x):\n\treturn x  # two  spaces\n\nend",
    "a <|im_start|>user lowbit rocks</s>", "tabs\tand trailing space ",
    "Called unconditionally to implement attribute accesses for instances of the class. "
    "If the class also defines __getattr__(), the latter will not be called unless "
    "__getattribute__() either calls it or raises an AttributeError.",
]
LEADING = ["  two leading spaces", " one", "\u3000ideographic space"]
needs_tokenize = pytest.mark.skipif(
    tools.find_tool("llama-tokenize") is None,
    reason=f"llama.cpp's llama-tokenize not found in {tools.tool_dir()}; {tools.BUILD_HINT}")


def _train(folder, **options):
    """A SentencePiece model trained on a few KB of text, as ``folder/tokenizer.model``."""
    from lowbit.data.corpus import corpus_text

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.txt").write_text(corpus_text("pydoc")[:20000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"), model_prefix=str(folder / "tokenizer"),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        **{"vocab_size": SPM_SIZE, "model_type": "bpe", "byte_fallback": True, "split_digits": True,
           "allow_whitespace_only_pieces": True, "remove_extra_whitespaces": False,
           "normalization_rule_name": "identity", **options})  # Llama 2's settings
    (folder / "text.txt").unlink()
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    _train(folder)
    return folder


def _with_added(tok):
    from tokenizers import AddedToken

    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    tok.add_tokens([AddedToken("lowbit", normalized=False)])  # matched in the raw text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "lowbit"]) == [SPM_SIZE, SPM_SIZE + 1]
    return tok


def _fast(folder):
    """transformers' fast Llama tokenizer made from ``tokenizer.model``."""
    from transformers import LlamaTokenizerFast

    return _with_added(LlamaTokenizerFast.from_pretrained(folder, add_bos_token=True))


def _llama2(folder):
    """The same with Llama 2's own ``tokenizer.json`` layout: normalizer Prepend("▁") +
    Replace(" ", "▁") and no pre-tokenizer, i.e. SentencePiece's dummy prefix on every text
    segment (transformers 5 builds a Metaspace "first" instead, see below)."""
    from tokenizers import normalizers

    tok = _fast(folder)
    tok.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def _slow(folder):
    """transformers' SentencePiece-backed (slow) tokenizer."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return _with_added(SentencePieceBackend(
        vocab_file=str(folder / "tokenizer.model"), unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", special_tokens_pattern="bos"))


def _llama(vocab_size=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama2", "slow"])
def exported(request, spm_dir, tmp_path_factory):
    tok = {"llama2": _llama2, "slow": _slow}[request.param](spm_dir)
    out = tmp_path_factory.mktemp(f"gguf-{request.param}") / "m.gguf"
    report = lowbit.export(_llama(), "gguf", out, tokenizer=tok, float_type="f32")
    assert report.tokenizer_pre == "default"
    return tok, out


def _field(reader, name):
    field = reader.get_field(name)
    return None if field is None else field.contents()


def test_metadata_follows_llama_cpp_converter(exported, spm_dir):
    from gguf import GGUFReader, TokenType

    tok, path = exported
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    reader = GGUFReader(path)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.pre") == "default"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == VOCAB
    assert tokens[:SPM_SIZE] == [sp.IdToPiece(i) for i in range(SPM_SIZE)]
    assert scores[:SPM_SIZE] == pytest.approx([sp.GetScore(i) for i in range(SPM_SIZE)])
    assert types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL,
                         TokenType.BYTE]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert set(types[259:SPM_SIZE]) == {TokenType.NORMAL}
    assert tokens[SPM_SIZE:] == ["<|im_start|>", "lowbit", "[PAD382]", "[PAD383]"]
    assert types[SPM_SIZE:] == [TokenType.CONTROL, TokenType.USER_DEFINED,
                                TokenType.UNUSED, TokenType.UNUSED]
    assert scores[SPM_SIZE:] == [-1000.0, -1000.0, -10000.0, -10000.0]
    assert [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown")] \
        == [1, 2, 0]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True


def _llama_cpp_ids(path, text, tmp_path) -> list[int]:
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(text.encode("utf-8"))
    proc = subprocess.run([str(tools.find_tool("llama-tokenize")), "-m", str(path), "-f",
                           str(prompt), "--ids", "--log-disable"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@needs_tokenize
def test_llama_cpp_tokenizes_like_hugging_face(exported, spm_dir, tmp_path):
    tok, path = exported
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert sp.encode("☃", out_type=str)[1:] == ["<0xE2>", "<0x98>", "<0x83>"]  # byte fallback
    for text in SAMPLES + LEADING:
        ours = _llama_cpp_ids(path, text, tmp_path)
        assert ours == tok(text)["input_ids"], (text, ours, tok(text)["input_ids"])
        assert ours[0] == 1 and len(ours) > 2
        if "<" not in text and "lowbit" not in text:  # SentencePiece has no added tokens
            assert ours[1:] == sp.encode(text), text


@needs_tokenize
def test_transformers_default_fast_tokenizer_agrees_on_plain_text(spm_dir, tmp_path):
    """transformers 5's fast Llama tokenizer built from ``tokenizer.model`` (Metaspace,
    prepend_scheme "first") puts no ``▁`` before text that starts with a space or follows a
    special token, where SentencePiece and llama.cpp do: plain text must agree."""
    tok = _fast(spm_dir)
    path = lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok).path
    for text in SAMPLES:
        if "<" not in text:
            assert _llama_cpp_ids(path, text, tmp_path) == tok(text)["input_ids"], text


def test_load_model_reads_the_export(exported):
    tok, path = exported
    model = lowbit.load_model(path)
    assert model.config.vocab_size == VOCAB
    ids = torch.tensor([tok("Hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    back = lowbit.load_tokenizer(path)  # transformers' GGUF tokenizer converter
    for text in SAMPLES:
        if "<" not in text:
            assert back(text)["input_ids"] == tok(text)["input_ids"], text


def test_fast_tokenizer_without_model_file_names_the_fix(spm_dir, tmp_path):
    from transformers import AutoTokenizer

    saved = tmp_path / "json-only"
    _fast(spm_dir).save_pretrained(saved)
    assert not (saved / "tokenizer.model").exists()
    tok = AutoTokenizer.from_pretrained(saved)
    with pytest.raises(TokenizerExportError, match="tokenizer.model is not available.*next to"):
        lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok)
    shutil.copy(spm_dir / "tokenizer.model", saved / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(saved)
    lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok)


def test_model_file_of_another_tokenizer_refused(spm_dir, tmp_path):
    other = _train(tmp_path / "other", **{"vocab_size": SPM_SIZE - 20})
    tok = _fast(spm_dir)
    tok.vocab_file = str(other)
    with pytest.raises(TokenizerExportError, match="does not match the tokenizer's vocabulary"):
        lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok)


def test_embedding_smaller_than_vocabulary_refused(spm_dir, tmp_path):
    with pytest.raises(TokenizerExportError, match="382 tokens.*only 300"):
        lowbit.export(_llama(300), "gguf", tmp_path / "m.gguf", tokenizer=_fast(spm_dir))


def test_settings_llama_cpp_cannot_follow_are_warned(tmp_path):
    from transformers import LlamaTokenizerFast

    folder = tmp_path / "unigram"
    _train(folder, model_type="unigram", remove_extra_whitespaces=True,
           normalization_rule_name="nmt_nfkc")
    tok = LlamaTokenizerFast.from_pretrained(folder)
    with pytest.warns(UserWarning, match="unigram model.*normalizes text.*repeated spaces"):
        lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok)


def test_wordpiece_tokenizer_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(TokenizerExportError, match="SentencePiece.*this one is WordPiece"):
        lowbit.export(_llama(), "gguf", tmp_path / "m.gguf", tokenizer=tok)
    assert not (tmp_path / "m.gguf").exists()
