"""Tests for lowbit.eval.perplexity_windows: protocols checked against NLL computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.eval.perplexity_windows import PerplexityError, perplexity, scored_range


class BigramLM(nn.Module):
    """logits[t] = table[ids[t]]: the next-token distribution depends on the current token only."""

    def __init__(self, vocab: int = 7, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def hand_nll(table: torch.Tensor, window: list[int], positions: range) -> list[float]:
    """-log softmax(table[window[i]])[window[i+1]] for i in positions, in plain Python."""
    out = []
    for i in positions:
        row = table[window[i]].tolist()
        log_z = math.log(sum(math.exp(v) for v in row))
        out.append(log_z - row[window[i + 1]])
    return out


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("protocol", ["full", "llama.cpp"])
def test_matches_hand_computed_nll(ids: torch.Tensor, protocol: str) -> None:
    model = BigramLM()
    window, n_windows = 10, 4
    res = perplexity(model, ids, window=window, n_windows=n_windows, protocol=protocol)
    positions = range(0, window - 1) if protocol == "full" else range(window // 2, window - 1)
    nlls: list[float] = []
    for w in range(n_windows):
        chunk = ids[w * window:(w + 1) * window].tolist()
        nlls += hand_nll(model.table.detach(), chunk, positions)
    assert res.n_tokens == len(nlls)
    assert res.nll_mean == pytest.approx(sum(nlls) / len(nlls), rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-6)
    assert res.n_windows == n_windows and res.window == window and res.protocol == protocol
    assert len(res.window_nll) == n_windows and res.seconds >= 0


def test_token_counts_per_protocol() -> None:
    """'full' scores window-1 tokens; 'llama.cpp' the second half: window - 1 - window//2
    (255 of 512, exactly as llama-perplexity counts `n_ctx - first - 1`)."""
    assert scored_range(512, "full") == (0, 511)
    assert scored_range(512, "llama.cpp") == (256, 511)
    ids = torch.zeros(512 * 3, dtype=torch.long)
    model = BigramLM()
    assert perplexity(model, ids, window=512, n_windows=3).n_tokens == 3 * 511
    assert perplexity(model, ids, window=512, n_windows=3, protocol="llama.cpp").n_tokens == \
        3 * 255
    assert perplexity(model, ids[:33], window=11, n_windows=3, protocol="llama.cpp").n_tokens \
        == 3 * 5


def test_uniform_model_ppl_is_vocab_size() -> None:
    class Uniform(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 50)

    for protocol in ("full", "llama.cpp"):
        res = perplexity(Uniform(), torch.arange(64) % 50, window=16, n_windows=4,
                         protocol=protocol)
        assert res.ppl == pytest.approx(50.0, rel=1e-6)


def test_hf_model_agrees_with_transformers_loss(tiny_llama_dir: Path) -> None:
    from lowbit.model import load_model

    model = load_model(tiny_llama_dir)
    ids = torch.randint(0, 300, (4 * 32,), generator=torch.Generator().manual_seed(2))
    res = perplexity(model, ids, window=32, n_windows=4)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids.view(4, 32)]
    assert res.nll_mean == pytest.approx(sum(losses) / 4, rel=1e-5)
    batched = perplexity(model, ids, window=32, n_windows=4, batch_size=3)
    assert batched.nll_mean == pytest.approx(res.nll_mean, rel=1e-5)


def test_logits_hook_streams_scored_logits(ids: torch.Tensor) -> None:
    model = BigramLM()
    seen: list[tuple[int, tuple[int, ...], torch.Tensor]] = []
    total = []

    def hook(i: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        seen.append((i, tuple(logits.shape), targets.clone()))
        total.append(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))

    res = perplexity(model, ids, window=10, n_windows=3, protocol="llama.cpp", logits_hook=hook)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(s[1] == (4, 7) for s in seen)
    assert torch.equal(seen[1][2], ids[16:20])  # window 1 = tokens 10..19, targets 16..19
    assert sum(t.item() for t in total) / res.n_tokens == pytest.approx(res.nll_mean, rel=1e-6)


def test_bos_replaces_first_token(ids: torch.Tensor) -> None:
    model = BigramLM()
    before = ids.clone()
    res = perplexity(model, ids, window=10, n_windows=1, bos_token_id=3)
    chunk = ids[:10].tolist()
    chunk[0] = 3
    nll = hand_nll(model.table.detach(), chunk, range(9))
    assert res.nll_mean == pytest.approx(sum(nll) / 9, rel=1e-6)
    assert torch.equal(ids, before)  # caller's tensor untouched


def test_too_short_and_fewer_windows(ids: torch.Tensor) -> None:
    model = BigramLM()
    with pytest.raises(PerplexityError, match="fewer than one window"):
        perplexity(model, ids[:5], window=10)
    with pytest.warns(UserWarning, match="using 10 instead of 32"):
        res = perplexity(model, ids, window=10, n_windows=32)
    assert res.n_windows == 10


def test_model_without_lm_head() -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    with pytest.raises(PerplexityError, match="no next-token logits.*LM head"):
        perplexity(bert, torch.arange(40) % 50, window=20, n_windows=2)

    class Pooled(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids.float().mean(-1, keepdim=True)

    with pytest.raises(PerplexityError, match="LM head"):
        perplexity(Pooled(), torch.arange(40), window=20, n_windows=2)


def test_bad_arguments_and_vocab_mismatch(ids: torch.Tensor) -> None:
    model = BigramLM()
    with pytest.raises(PerplexityError, match="unknown protocol"):
        perplexity(model, ids, window=10, protocol="sliding")
    with pytest.raises(PerplexityError, match="outside the model's vocabulary"):
        perplexity(nn.Sequential(nn.Embedding(100, 7)), torch.arange(100), window=10,
                   n_windows=2)
    with pytest.raises(PerplexityError, match="1-D"):
        perplexity(model, ids.view(4, 25), window=10)


def test_training_mode_restored(ids: torch.Tensor) -> None:
    model = BigramLM().train()
    perplexity(model, ids, window=10, n_windows=2)
    assert model.training


@pytest.mark.real_model
def test_real_smollm2_pydoc_reference() -> None:
    """Bundled SmolLM2 (GGUF -> FP32) on the pydoc corpus, against numbers measured once.

    The full benchmark (32 x 512 tokens) gives PPL 14.457 as in BENCHMARKS.md; this checks
    2 x 128 tokens to stay fast. No BOS is added (SmolLM2's tokenizer adds none).
    """
    from lowbit.data import tokens
    from lowbit.model import load_model, load_tokenizer

    model = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    ids = tokens("pydoc", tok, count=256)
    assert ids[:6].tolist() == [504, 476, 3391, 18, 4814, 198]  # 'The "assert" statement\n'
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids
    res = perplexity(model, ids, window=128, n_windows=2)
    assert res.n_tokens == 254
    assert res.ppl == pytest.approx(20.5277, rel=1e-4)
