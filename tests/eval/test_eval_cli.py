"""``lowbit eval`` end to end on tiny models: the llama.cpp protocol, encoders, and bad input
(text too short for one window, no LM head, different vocabularies)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.cli.main import main


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _eval_json(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--window", "32", "--no-speed", "--threads", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_llama_cpp_protocol_end_to_end(tiny_llama_dir: Path, capsys) -> None:
    from lowbit.data import tokens
    from lowbit.eval.perplexity_windows import perplexity
    from lowbit.model import load_model, load_tokenizer

    d = str(tiny_llama_dir)
    res = _eval_json(capsys, d, "--baseline", d, "--windows", "3", "--protocol", "llama.cpp")
    assert res["protocol"] == "llama.cpp" and res["tokens_scored"] == 3 * 15
    ids = tokens("pydoc", load_tokenizer(d), count=96)
    direct = perplexity(load_model(d), ids, window=32, n_windows=3, protocol="llama.cpp")
    assert res["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert res["baseline_ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert abs(res["kld_mean"]) < 1e-4 and res["top1_agreement"] == 1.0
    full = _eval_json(capsys, d, "--windows", "3")
    assert full["tokens_scored"] == 3 * 31 and full["ppl"] != res["ppl"]


def test_text_too_short_for_one_window(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    rc = main(["eval", str(tiny_llama_dir), "--data", str(short), "--window", "32",
               "--no-speed", "--threads", "1"])
    assert rc == 2
    assert "fewer than one window of 32; pass a longer text or a smaller window" in \
        capsys.readouterr().err
    words = tmp_path / "some.txt"
    words.write_text(" ".join(["the list method"] * 40))
    with pytest.warns(UserWarning, match="windows of 32 tokens fit"):
        res = _eval_json(capsys, str(tiny_llama_dir), "--data", str(words), "--windows", "50")
    assert 0 < res["tokens_scored"] < 50 * 31


def test_model_without_lm_head(tiny_llama_dir: Path) -> None:
    from lowbit.eval import PerplexityError, evaluate
    from lowbit.model import load_tokenizer

    class Pooled(nn.Module):
        def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
            return ids.float().mean(-1, keepdim=True)

    with pytest.raises(PerplexityError, match="no next-token logits.*LM head"):
        evaluate(Pooled(), load_tokenizer(tiny_llama_dir), window=32, n_windows=1, speed=False)


def test_different_vocabularies(tiny_llama_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.errors import LowbitError
    from lowbit.eval import evaluate
    from lowbit.eval.compare import ComparisonError
    from lowbit.model import load_model, load_tokenizer

    base = load_model(tiny_llama_dir)
    cfg = LlamaConfig(**{**base.config.to_dict(), "vocab_size": 320})
    other = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ComparisonError, match="disagree on the vocabulary.*300 vs 320"):
        evaluate(other, load_tokenizer(tiny_llama_dir), baseline=base, window=32, n_windows=1,
                 speed=False)
    assert issubclass(ComparisonError, LowbitError)  # the CLI prints it as a clean error


def test_eval_prints_an_encoder(tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path, safe_serialization=True)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    rc = main(["eval", str(tmp_path), "--recipe", "w8", "--baseline", str(tmp_path),
               "--no-speed", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cosine vs base" in out and "nearest neighbour agreement" in out
