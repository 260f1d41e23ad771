"""The fused C decode step (``runtime.native_step``) against the runtime's torch operations."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lowbit.kernels import native
from lowbit.runtime import DecoderRuntime, UnsupportedModelError, generate
from tests.runtime.test_decoder import ids, tiny

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernels unavailable: {native.why_unavailable()}")


def _steps(runtime: DecoderRuntime, x: torch.Tensor, start: int) -> list[torch.Tensor]:
    runtime.prefill(x[:, :start], max_len=x.shape[1])
    return [runtime.decode(x[:, p : p + 1]).clone() for p in range(start, x.shape[1])]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_step_matches_torch_ops(heads: int, kv_heads: int, batch: int) -> None:
    model = tiny("llama", heads, kv_heads)
    x = ids(batch=batch, length=20)
    with native.force(True):
        fused = DecoderRuntime(model, dtype=torch.float32, native=True, activations=None)
    plain = DecoderRuntime(model, dtype=torch.float32, native=False)
    assert fused.decode_path.startswith("native fused ops")
    assert plain.decode_path.startswith("torch ops (disabled")
    for a, b in zip(_steps(fused, x, 5), _steps(plain, x, 5), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fused_step_with_quantized_linears_gives_the_same_tokens() -> None:
    from lowbit import quantize

    model = tiny()
    quantize(model, "w4g32", progress=False)
    x = ids(batch=1, length=6)
    with native.force(True):
        fused = DecoderRuntime(model, dtype=torch.float32, activations=None)
        assert fused.decode_path.startswith("native fused ops")
        got, _ = generate(fused, x, 24, dtype=torch.float32)
        want, _ = generate(DecoderRuntime(model, dtype=torch.float32, native=False), x, 24,
                           dtype=torch.float32)
    assert torch.equal(got, want)


def test_where_it_cannot_run_it_says_why() -> None:
    model = tiny()
    assert "bfloat16" in DecoderRuntime(model, dtype=torch.bfloat16).decode_path
    with pytest.raises(UnsupportedModelError, match="computes in torch.bfloat16"):
        DecoderRuntime(model, dtype=torch.bfloat16, native=True)
    with native.force(False):
        assert "not preferred" in DecoderRuntime(model, dtype=torch.float32).decode_path


def test_attend_matches_sdpa_on_a_long_cache() -> None:
    """Many positions (the threaded branch of ``lowbit_attend``), 9 query heads on 3 kv heads
    as in SmolLM2, against RoPE + ``F.scaled_dot_product_attention`` in float64."""
    lib = native.library()
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, length, pos = 9, 3, 64, 600, 511
    q, k, v = (torch.randn(1, h * dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cos, sin = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    kc = torch.randn(1, kv_heads, length, dim, generator=gen)
    vc = torch.randn(1, kv_heads, length, dim, generator=gen)
    out = torch.empty(1, heads * dim)
    scores = torch.empty(heads * (pos + 1))

    def rope(t):
        return t * cos + torch.roll(t, dim // 2, -1) * sin

    qr = rope(q.view(heads, dim))
    kr, vr = rope(k.view(kv_heads, dim)), v.view(kv_heads, dim)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref[0, :, pos], vc_ref[0, :, pos] = kr, vr
    lib.lowbit_attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), 1, heads, kv_heads, dim, pos,
                      length, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                      0.125, out.data_ptr(), scores.data_ptr())
    torch.testing.assert_close(kc, kc_ref, atol=1e-6, rtol=1e-6)  # cache written at pos
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)
    ref = F.scaled_dot_product_attention(
        qr.double().view(1, kv_heads, heads // kv_heads, dim),
        kc_ref[:, :, : pos + 1].double(), vc_ref[:, :, : pos + 1].double(), scale=0.125)
    torch.testing.assert_close(out.view(-1).double(), ref.reshape(-1), atol=1e-5, rtol=1e-5)


def test_norm_and_silu_match_torch() -> None:
    lib = native.library()
    gen = torch.Generator().manual_seed(1)
    x, d = torch.randn(3, 577, generator=gen), torch.randn(3, 577, generator=gen)
    w = torch.randn(577, generator=gen)
    out = torch.empty(3, 577)
    want_x = x + d
    lib.lowbit_add_rmsnorm(x.data_ptr(), d.data_ptr(), 3, 577, w.data_ptr(), 1e-5,
                           out.data_ptr())
    torch.testing.assert_close(x, want_x, atol=0, rtol=0)
    torch.testing.assert_close(out, F.rms_norm(want_x, (577,), w, 1e-5), atol=1e-5, rtol=1e-5)
    g, u = torch.randn(1000, generator=gen) * 8, torch.randn(1000, generator=gen)
    got = torch.empty(1000)
    lib.lowbit_silu_mul(g.data_ptr(), u.data_ptr(), 1000, got.data_ptr())
    torch.testing.assert_close(got, F.silu(g) * u, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["w8", "w4g32"])
def test_merged_qkv_and_gate_up_give_the_same_logits(recipe: str, monkeypatch) -> None:
    """q/k/v and gate/up run as one GEMV each; the rows are the same rows, so the logits are
    identical to the step that calls each linear."""
    from lowbit import quantize
    from lowbit.runtime import native_step

    model = tiny(kv_heads=4)  # k/v with 64 rows: whole row blocks on AVX2 (32) and AVX-512 (64)
    quantize(model, recipe, progress=False)
    x = ids(batch=1, length=12)
    with native.force(True):
        merged = DecoderRuntime(model, dtype=torch.float32, activations=None)
        assert all(a is not None and b is not None for a, b in merged._native_step._merged)
        got = _steps(merged, x, 4)
        monkeypatch.setattr(native_step, "_merged", lambda modules: None)
        separate = DecoderRuntime(model, dtype=torch.float32, activations=None)
        assert separate._native_step._merged[0] == (None, None)
        want = _steps(separate, x, 4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_merged_callable_concatenates_and_refuses_mixed_layers() -> None:
    from lowbit import quantize
    from lowbit.nn import QuantizedLinear

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(64, 32, bias=False),
                                 torch.nn.Linear(64, 40))
    quantize(layers, "w8", progress=False)
    x = torch.randn(2, 64)
    with native.force(True):
        f = QuantizedLinear.merged_decode_callable(list(layers), torch.float32)
        want = torch.cat([m(x) for m in layers], -1)
        torch.testing.assert_close(f(x), want, atol=1e-5, rtol=1e-5)
        big = torch.randn(native.MAX_ROWS, 64)  # prefill rows: the layers one by one
        torch.testing.assert_close(f(big), torch.cat([m(big) for m in layers], -1))
        other = torch.nn.Sequential(torch.nn.Linear(64, 64))
        quantize(other, "w4g32", progress=False)
        assert QuantizedLinear.merged_decode_callable([layers[0], other[0]],
                                                      torch.float32) is None
        assert QuantizedLinear.merged_decode_callable(list(layers), torch.bfloat16) is None
        tail = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 40))
        quantize(tail, "w4g32", progress=False)  # 40 rows: a short int4 block, not mergeable
        assert QuantizedLinear.merged_decode_callable(list(tail), torch.float32) is None


@pytest.mark.parametrize("recipe", ["w8-rot", "w4g32-rot"])
def test_rotated_weight_only_layers_decode_natively(recipe: str, tmp_path) -> None:
    """A weight-only layer that rotates its input decodes as one native rotation then its
    GEMV (alone or merged); both equal the layer's forward, a runtime over them gives the
    torch step's greedy tokens, and the model saves and loads with its rotation."""
    from lowbit import load, quantize, save
    from lowbit.nn import QuantizedLinear

    torch.manual_seed(0)
    # (rows in whole int4 row blocks: 32 on AVX2, 64 on AVX-512, so merging applies)
    layers = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(48, 128))
    quantize(layers, recipe, progress=False)
    assert layers[0].spec.rotation == "hadamard"
    x = torch.randn(3, 48)
    with native.force(True):
        one = layers[0].decode_callable(torch.float32)
        assert one is not None
        torch.testing.assert_close(one(x), layers[0](x), atol=1e-4, rtol=1e-4)
        merged = QuantizedLinear.merged_decode_callable(list(layers), torch.float32)
        assert merged is not None
        torch.testing.assert_close(merged(x), torch.cat([m(x) for m in layers], -1),
                                   atol=1e-4, rtol=1e-4)
        model = tiny(kv_heads=4)
        quantize(model, recipe, progress=False)
        ids_ = ids(batch=1, length=6)
        got, _ = generate(DecoderRuntime(model, dtype=torch.float32, activations=None), ids_, 16,
                          dtype=torch.float32)
        want, _ = generate(DecoderRuntime(model, dtype=torch.float32, native=False), ids_, 16,
                           dtype=torch.float32)
    assert torch.equal(got, want)
    layer = model.model.layers[0].mlp.down_proj
    kernel = {"w8-rot": "int8_weight.", "w4g32-rot": "int4_weight."}[recipe]
    assert layer.spec.rotation == "hadamard" and layer.kernel.startswith(kernel)
    save(model, tmp_path / recipe)
    again = load(tmp_path / recipe)
    with torch.no_grad():
        assert torch.equal(again(ids_).logits, model(ids_).logits)
