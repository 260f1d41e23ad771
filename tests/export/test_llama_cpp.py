"""llama.cpp itself runs lowbit's GGUF exports (skipped when its tools are not built:
``scripts/build_llama_cpp.sh``). No mocks: these call the real binaries."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export import llama_cpp_tools as tools  # noqa: E402

from .conftest import tiny_decoder  # noqa: E402

needs_llama_cpp = pytest.mark.skipif(
    tools.find_tool("llama-perplexity") is None or tools.find_tool("llama-completion") is None,
    reason=f"llama.cpp tools not found in {tools.tool_dir()}; {tools.BUILD_HINT}")
PROMPT = "The capital of France is"


def _lowbit_ppl(model, tokenizer, text_file, window, windows) -> float:
    from lowbit.eval import evaluate

    r = evaluate(model, tokenizer, data=str(text_file), window=window, n_windows=windows,
                 protocol="llama.cpp", speed=False)
    return r["ppl"]


@needs_llama_cpp
@pytest.mark.parametrize("recipe", ["w8", "w4g32"])
def test_tiny_model_perplexity_agrees(recipe, tmp_path, tiny_tok):
    from lowbit.data.corpus import corpus_text

    text = tmp_path / "text.txt"
    text.write_text(corpus_text("pydoc")[:40000])
    model = tiny_decoder("llama")
    lowbit.quantize(model, recipe)
    path = lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok,
                         embedding_type="f32").path
    theirs = tools.perplexity(path, text, ctx=128, chunks=6)
    ours = _lowbit_ppl(model, tiny_tok, text, 128, 6)
    assert math.isfinite(theirs) and abs(theirs / ours - 1) < 0.01, (theirs, ours)


@pytest.fixture(scope="module")
def smollm2_w8(tmp_path_factory):
    model = lowbit.load_model("smollm2-135m")
    tokenizer = lowbit.load_tokenizer("smollm2-135m")
    lowbit.quantize(model, "gguf:q8_0")  # int8 per 32 inputs; the tied embedding is the head
    out = tmp_path_factory.mktemp("smollm2") / "w8.gguf"
    lowbit.export(model, "gguf", out, tokenizer=tokenizer)
    return model, tokenizer, out


def _greedy(model, tokenizer, n=16) -> tuple[list[int], list[int]]:
    from lowbit.runtime.generation import generate

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    tokens, _ = generate(model, torch.tensor([ids]), n, dtype=torch.float32)
    return ids, tokens[0, len(ids):].tolist()


@needs_llama_cpp
@pytest.mark.real_model
def test_smollm2_float_greedy_tokens_match_exactly(tmp_path):
    """F32 weights: llama.cpp computes in float32 (no activation rounding): same 16 tokens."""
    model = lowbit.load_model("smollm2-135m")
    tokenizer = lowbit.load_tokenizer("smollm2-135m")
    path = lowbit.export(model, "gguf", tmp_path / "f32.gguf", tokenizer=tokenizer,
                         float_type="f32", embedding_type="f32").path
    _, ours = _greedy(model, tokenizer)
    assert tools.greedy_text(path, PROMPT, 16) == tokenizer.decode(ours).rstrip("\n")


@needs_llama_cpp
@pytest.mark.real_model
def test_smollm2_w8_greedy_tokens_agree(smollm2_w8):
    """Q8_0: llama.cpp rounds activations to 8 bits in its dot products, so near-ties may go
    the other way: every token llama.cpp picks (fed its own continuation) must be lowbit's
    argmax or within 0.5 logits of it, and the first 4 tokens must be identical."""
    from lowbit.runtime.generation import prefill_logits

    model, tokenizer, path = smollm2_w8
    prompt, ours = _greedy(model, tokenizer)
    theirs = tools.greedy_text(path, PROMPT, 16)
    full = tokenizer(PROMPT + theirs, add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    picked = full[len(prompt):]
    assert picked[:4] == ours[:4], (tokenizer.decode(picked), tokenizer.decode(ours))
    logits = prefill_logits(model, torch.tensor([full]), dtype=torch.float32)[0]
    for pos, token in enumerate(picked):
        row = logits[len(prompt) + pos - 1]
        assert row[token] >= row.max() - 0.5, (pos, tokenizer.decode(picked))


@needs_llama_cpp
@pytest.mark.real_model
def test_smollm2_w8_perplexity_agrees(smollm2_w8, tmp_path):
    from lowbit.data.corpus import corpus_text

    model, tokenizer, path = smollm2_w8
    text = tmp_path / "pydoc.txt"
    text.write_text(corpus_text("pydoc"))
    theirs = tools.perplexity(path, text, ctx=512, chunks=4)
    ours = _lowbit_ppl(model, tokenizer, text, 512, 4)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
