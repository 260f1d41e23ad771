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
    lowbit.quantize(model, "w8")
    out = tmp_path_factory.mktemp("smollm2") / "w8.gguf"
    lowbit.export(model, "gguf", out, tokenizer=tokenizer)
    return model, tokenizer, out


@needs_llama_cpp
@pytest.mark.real_model
def test_smollm2_w8_greedy_tokens_match(smollm2_w8):
    from lowbit.runtime.generate import generate

    model, tokenizer, path = smollm2_w8
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    tokens, _ = generate(model, ids, 16, dtype=torch.float32)
    ours = tokenizer.decode(tokens[0, ids.shape[1]:])
    theirs = tools.greedy_text(path, PROMPT, 16)
    assert theirs.strip() == ours.strip(), (theirs, ours)


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
