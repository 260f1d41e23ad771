"""Prefill's C kernels against their torch references: the causal attention with RoPE and
cache writes (``kernels.prefill_attention``), W8A8's activation codes for many rows (with
and without the Hadamard rotation) and its in-place dequantization, and a W8A8 group
(q/k/v reading one input) against each layer on its own."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.rotation import hadamard_factors, rotate
from lowbit.kernels import int8_dynamic as k8a8
from lowbit.kernels import native
from lowbit.kernels import prefill_attention as pa

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernels unavailable: {native.why_unavailable()}")


def _tables(length: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(length)[:, None] * torch.rand(dim // 2, generator=gen)[None]
    angle = torch.cat([angle, angle], 1)
    sin = angle.sin()
    sin[:, : dim // 2] *= -1  # the runtime's tables: -sin in the first half
    return angle.cos().contiguous(), sin.contiguous()


# (batch, tokens, query heads, kv heads, head dim, cache length): SmolLM2's heads, GQA and
# plain multi-head, head dims 8..128, token counts off the 16-token blocks, one token
SHAPES = [(1, 130, 9, 3, 64, 160), (2, 37, 4, 2, 8, 40), (1, 1, 4, 4, 16, 8),
          (3, 100, 6, 1, 24, 128), (1, 77, 8, 8, 128, 77)]


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_attention_matches_torch(shape) -> None:
    batch, length, heads, kv_heads, dim, max_len = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, length, heads * dim, generator=gen)
    k, v = (torch.randn(batch, length, kv_heads * dim, generator=gen) for _ in range(2))
    cos, sin = _tables(max_len, dim, gen)
    caches = [torch.full((batch, kv_heads, max_len, dim), 7.0) for _ in range(4)]
    want = pa.attend_torch(q, k, v, cos, sin, caches[0], caches[1], dim**-0.5, heads)
    got = pa.attend(q, k, v, cos, sin, caches[2], caches[3], dim**-0.5, heads)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-6, rtol=1e-6)  # roped keys
    assert torch.equal(caches[3], caches[1])  # values copied; positions past T untouched
    assert torch.equal(caches[2][:, :, length:], caches[0][:, :, length:])


def test_prefill_attention_is_causal() -> None:
    """Changing a later token's key and value leaves every earlier output unchanged."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4 * 16, generator=gen)
    k, v = (torch.randn(1, 40, 2 * 16, generator=gen) for _ in range(2))
    cos, sin = _tables(40, 16, gen)
    out = [pa.attend(q, kk, vv, cos, sin, torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16),
                     0.25, 4) for kk, vv in ((k, v), (k.clone().index_fill_(1, torch.tensor(
                         [30]), 5.0), v.clone().index_fill_(1, torch.tensor([30]), -5.0)))]
    assert torch.equal(out[0][:, :30], out[1][:, :30])
    assert not torch.allclose(out[0][:, 30:], out[1][:, 30:])


def test_prefill_attention_refuses_what_it_does_not_take() -> None:
    q = torch.randn(1, 4, 2 * 12)
    k = v = torch.randn(1, 4, 12)
    cos = sin = torch.ones(4, 12)
    with pytest.raises(ValueError, match="unsupported shape"):  # head dim 12: not 8k
        pa.attend(q, k, v, cos, sin, torch.zeros(1, 1, 4, 12), torch.zeros(1, 1, 4, 12), 1.0, 2)
    with pytest.raises(ValueError, match="float32"):
        pa.attend(q.bfloat16(), k, v, cos, sin, torch.zeros(1, 1, 4, 12),
                  torch.zeros(1, 1, 4, 12), 1.0, 2)


@pytest.mark.parametrize("k", [576, 200, 1536])
def test_activation_codes_equal_torch_without_rotation(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(70, k, generator=gen) * torch.rand(70, 1, generator=gen) * 10
    x[3] = 0.0  # an all-zero token: the floor scale, codes 0
    x[5, 7] = 2.5 * x[5].abs().max()  # an outlier
    codes, scales = k8a8.activation_codes(x)
    want_codes, want_scales = k8a8.quantize_per_token(x)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    codes, none = k8a8.activation_codes(x, (), 0.05)
    assert none is None and torch.equal(codes, k8a8.quantize_per_tensor(x, 0.05))


@pytest.mark.parametrize("k", [576, 1536, 64])
def test_activation_codes_rotate_as_torch(k: int) -> None:
    """With the rotation the float32 sums run in another order: scales within 1e-6, codes
    off by at most one step (a near-tie) and almost all equal."""
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    codes, scales = k8a8.activation_codes(x, hadamard_factors(k))
    want_codes, want_scales = k8a8.quantize_per_token(rotate(x.double()).float())
    torch.testing.assert_close(scales, want_scales, atol=0, rtol=1e-6)
    diff = (codes.int() - want_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_dequant_in_place_equals_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**20, 2**20, (33, 70), generator=gen, dtype=torch.int32)
    xs, ws = torch.rand(33, 1, generator=gen), torch.rand(70, generator=gen)
    want = torch.mul(acc, xs).mul_(ws)
    want_static = torch.mul(acc, ws)
    assert torch.equal(native.w8a8_dequant(acc.clone(), xs, ws), want)
    assert torch.equal(native.w8a8_dequant(acc.clone(), None, ws), want_static)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rotated", [False, True])
def test_group_equals_each_layer(static: bool, rotated: bool) -> None:
    """q/k/v from one set of codes: exactly each layer's own W8A8 without rotation; with it
    within one activation step of the layer rotating its own copy in torch."""
    gen = torch.Generator().manual_seed(int(static) * 2 + int(rotated))
    k, rows = 576, 40
    states, biases = [], [None, torch.randn(192, generator=gen), None]
    for n in (576, 192, 192):
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
        states.append(k8a8.prepare_int8_static(codes, scale, 0.02) if static
                      else k8a8.prepare_int8_dynamic(codes, scale))
    factors = hadamard_factors(k) if rotated else ()
    group = k8a8.group_prefill_callable(states, biases, factors)
    x = torch.randn(2, rows // 2, k, generator=gen)
    linear = k8a8.int8_static_linear if static else k8a8.int8_dynamic_linear
    xr = rotate(x) if rotated else x
    for got, state, bias in zip(group(x), states, biases, strict=True):
        want = linear(xr, state, bias)
        assert got.shape == want.shape == (2, rows // 2, state.out_features)
        if rotated:  # one code step of one input: |w| <= 127 * s_w, times s_x
            step = 127 * state.scale.max() * (0.02 if static else xr.abs().amax() / 127)
            assert (got - want).abs().max() <= 3 * step
        else:
            assert torch.equal(got, want)


def test_group_needs_one_static_scale() -> None:
    codes = torch.zeros(4, 8, dtype=torch.int8)
    a = k8a8.prepare_int8_static(codes, torch.ones(4), 0.1)
    b = k8a8.prepare_int8_static(codes, torch.ones(4), 0.2)
    assert k8a8.group_prefill_callable([a, b], [None, None], ()) is None


def test_prefill_attention_avx2_and_avx512_agree() -> None:
    """The AVX2 blocks (forced) and the AVX-512 ones (where the CPU has them) sum every
    output in the same order: the same numbers."""
    from lowbit.runtime.native_loop import avx2_only

    batch, length, heads, kv_heads, dim, max_len = SHAPES[0]
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(batch, length, heads * dim, generator=gen)
    k, v = (torch.randn(batch, length, kv_heads * dim, generator=gen) for _ in range(2))
    cos, sin = _tables(max_len, dim, gen)
    caches = [torch.zeros(batch, kv_heads, max_len, dim) for _ in range(4)]
    wide = pa.attend(q, k, v, cos, sin, caches[0], caches[1], 0.125, heads)
    with avx2_only():
        narrow = pa.attend(q, k, v, cos, sin, caches[2], caches[3], 0.125, heads)
    assert torch.equal(wide, narrow)


@pytest.mark.parametrize("recipe", ["nf4g64", "kmeans4", "gguf:q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widened_weights_equal_torch(recipe: str, dtype: torch.dtype) -> None:
    """NF4, per-row k-means and int8-per-group (Q8_0) layers widened in C: the torch path's
    numbers exactly, in float32 and bfloat16."""
    import lowbit
    from lowbit.nn.linear import QuantizedLinear

    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(256, 24), torch.nn.Linear(24, 7))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    lowbit.quantize(model, recipe, progress=False)
    layers = [m for m in model.modules() if type(m) is QuantizedLinear]
    assert layers
    x = torch.randn(40, 256, generator=gen).to(dtype)
    for layer in layers:
        state = layer._state
        got = layer.backend.forward(x[:, : layer.in_features], state, layer.bias)
        want_w = state.dequantize(dtype)
        want = torch.nn.functional.linear(x[:, : layer.in_features], want_w,
                                          None if layer.bias is None else layer.bias.to(dtype))
        assert torch.equal(got, want.to(got.dtype)), recipe


@pytest.mark.parametrize("k,group", [(37, 37), (200, 64), (96, 32)])
def test_lookup_weight_layouts(k: int, group: int) -> None:
    """Whole rows and groups, an odd K and a partial last group: ``T[u] * s`` and per-row
    ``T[n, g, u]`` as float32 products, then each dtype's rounding."""
    from lowbit.formats import pack
    from lowbit.kernels.weight_dequant import lookup_weight

    gen = torch.Generator().manual_seed(k)
    n, groups = 5, -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    table, scales = torch.randn(16, generator=gen), torch.rand(n, groups, generator=gen)
    tables = torch.randn(n, groups, 16, generator=gen)
    col = torch.arange(k) // group
    want_shared = table[codes.long()] * scales[:, col]
    want_rows = tables[torch.arange(n)[:, None], col[None], codes.long()]
    for dtype in (torch.float32, torch.bfloat16):
        got = lookup_weight(pack(codes, 4), k, table, scales, group, dtype)
        assert torch.equal(got, want_shared.to(dtype))
        got = lookup_weight(pack(codes, 4), k, tables, None, group, dtype)
        assert torch.equal(got, want_rows.to(dtype))


def test_kernels_rebind_after_the_library_is_reloaded(monkeypatch, tmp_path) -> None:
    """``native.reset`` loads another copy of the library, whose functions start without
    argument types: each wrapper binds the copy loaded now (a wrapper that had cached the
    first copy's binding once passed 64-bit pointers as C ints to the second: a crash)."""
    from lowbit.formats import pack
    from lowbit.kernels.weight_dequant import int8_weight, lookup_weight

    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (6, 64), generator=gen, dtype=torch.int8)
    nibbles = torch.randint(0, 16, (6, 64), generator=gen, dtype=torch.uint8)
    scales, table = torch.rand(6, 2, generator=gen), torch.randn(16, generator=gen)
    q = torch.randn(1, 20, 2 * 16, generator=gen)
    kv = torch.randn(1, 20, 16, generator=gen)
    cos, sin = _tables(20, 16, gen)

    def run():
        caches = torch.zeros(1, 1, 20, 16), torch.zeros(1, 1, 20, 16)
        return (int8_weight(codes, 64, scales, 32, torch.float32),
                lookup_weight(pack(nibbles, 4), 64, table, scales, 32, torch.float32),
                pa.attend(q, kv, kv, cos, sin, *caches, 0.25, 2))

    first = run()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # a fresh build, loaded anew
    native.reset()
    try:
        for a, b in zip(run(), first, strict=True):
            assert torch.equal(a, b)
    finally:
        monkeypatch.undo()
        native.reset()


def test_codebooks_of_other_widths_keep_the_torch_path() -> None:
    """Only 4-bit codes widen in C: an 8-bit per-row codebook (256 centroids) computes
    with its own dequantized weight."""
    import dataclasses

    import lowbit

    recipe = lowbit.Recipe.parse("kmeans4")
    weight = dataclasses.replace(recipe.default.weight, format="codebook8")
    recipe = dataclasses.replace(recipe, rules=(), default=dataclasses.replace(
        recipe.default, weight=weight))
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    lowbit.quantize(model, recipe, progress=False)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.linear(x, model[0].dequantize_weight(), model[0].bias)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
