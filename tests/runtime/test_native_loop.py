"""The one-call decode step (``runtime.native_loop``, ``csrc/decode_loop.c``) against the
Python runtime, and each of its kernels against a float64 reference.

Float activations: logits within 1e-4 of the runtime's torch step (both with lowbit's native
GEMVs, so the same weights and float32 math) and the same 64 greedy tokens; W8A8 layers
quantize their input per token in both, where a float32 rounding difference (the rotation)
can move one code: within 1% of the logit range there. Int8
activations (per block of 32, AVX512-VNNI): within 5% of the logit range, and at least 95%
of greedy tokens the same (the accuracy cost, as llama.cpp's Q8_0 activations).
"""

from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch

from lowbit.kernels import native
from lowbit.runtime import DecoderRuntime, generate, native_layouts
from lowbit.runtime import native_loop as nl
from tests.runtime.test_decoder import ids, tiny

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernels unavailable: {native.why_unavailable()}")
# weight-only, W8A8 (per token, Hadamard-rotated inputs; plain; static with calibrated
# scales) and a GPTQ recipe on rotated inputs: every layout and own-input path of the loop
RECIPES = [None, "w8", "w4g32", "gguf:q4_0", "w8a8", "w8a8-plain", "w8a8-static-rot",
           "w4g32-gptq-rot", "nf4g64", "kmeans4", "gguf:iq4_nl",
           "fp8"]  # fp8: no packed layout, its dequantized weight as LB_F32


def _model(kind: str, recipe: str | None):
    from lowbit import quantize
    from lowbit.model.recipe import Recipe

    model = tiny(kind)
    if recipe:
        calib = None
        if Recipe.parse(recipe).needs_calibration:
            gen = torch.Generator().manual_seed(11)
            calib = [torch.randint(0, model.config.vocab_size, (1, 32), generator=gen)
                     for _ in range(4)]
        quantize(model, recipe, calib, progress=False)
    return model


def _greedy_logits(rt: DecoderRuntime, x: torch.Tensor, steps: int):
    """Greedy tokens and each step's logits, feeding back the runtime's own argmax."""
    logits = [rt.prefill(x, max_len=x.shape[1] + steps)]
    for _ in range(steps):
        logits.append(rt.decode(logits[-1].argmax(-1, keepdim=True)).clone())
    out = torch.cat(logits)
    return out.argmax(-1), out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_float_loop_matches_the_python_runtime(kind: str, recipe: str | None) -> None:
    model, x = _model(kind, recipe), ids(length=6)
    with native.force(True):
        loop = DecoderRuntime(model, dtype=torch.float32)
        ref = DecoderRuntime(model, dtype=torch.float32, native=False)
        assert loop.decode_path.startswith("native loop (float")
        got_tokens, got = _greedy_logits(loop, x, 64)
        want_tokens, want = _greedy_logits(ref, x, 64)
    assert torch.equal(got_tokens, want_tokens)
    if recipe and "a8" in recipe:  # float32 rounding of a rotated input moves a code by 1
        assert (got - want).abs().max() <= 0.01 * (want.max() - want.min())
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _isa(name: str):
    """The int8 kernels of one instruction set: ``vnni`` (skipped without it) or ``avx2``."""
    if name == "vnni" and not nl.has_vnni():
        pytest.skip("the CPU lacks AVX512-VNNI")
    return nl.avx2_only() if name == "avx2" else contextlib.nullcontext()


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_int8_activation_loop_is_close_and_agrees(recipe: str | None, isa: str) -> None:
    model, x = _model("llama", recipe), ids(length=6)
    with native.force(True), _isa(isa):
        loop = DecoderRuntime(model, dtype=torch.float32, activations="int8")
        assert loop.decode_path.startswith("native loop (int8")
        got_tokens, got = _greedy_logits(loop, x, 64)
        want_tokens, want = _greedy_logits(DecoderRuntime(model, dtype=torch.float32), x, 64)
    assert (got_tokens == want_tokens).float().mean() >= 0.95
    assert (got - want).abs().max() <= 0.05 * (want.max() - want.min())


def test_auto_takes_a_measured_choice_and_says_which() -> None:
    model, x = _model("llama", "w8"), ids(length=6)
    with native.force(True):
        rt = DecoderRuntime(model, dtype=torch.float32, activations="auto")
        want = "int8" if nl.has_vnni() else "float"
        assert rt._native_loop.activations in (want, "float")
        assert rt.decode_path.startswith(f"native loop ({rt._native_loop.activations} ")
        tokens, _ = _greedy_logits(rt, x, 8)
    assert tokens.shape == (9,)


def test_threads_do_not_change_the_numbers() -> None:
    model, x = _model("llama", "w4g32"), ids(length=6)
    before = torch.get_num_threads()
    with native.force(True):
        rt = DecoderRuntime(model, dtype=torch.float32)
        try:
            torch.set_num_threads(1)
            one = _greedy_logits(rt, x, 16)[1]
            torch.set_num_threads(2)
            two = _greedy_logits(rt, x, 16)[1]
        finally:
            torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)


def test_batches_above_one_take_the_fused_step() -> None:
    model, x = _model("llama", "w8"), ids(batch=2, length=6)
    with native.force(True):
        got, _ = generate(DecoderRuntime(model, dtype=torch.float32), x, 8, dtype=torch.float32)
        want, _ = generate(DecoderRuntime(model, dtype=torch.float32, native=False), x, 8,
                           dtype=torch.float32)
    assert torch.equal(got, want)


def test_where_it_cannot_run_it_says_why() -> None:
    from lowbit import quantize

    model = tiny()
    with native.force(True):
        assert "bfloat16" in DecoderRuntime(model, dtype=torch.bfloat16).native_loop_why
        assert "disabled" in DecoderRuntime(model, dtype=torch.float32,
                                            native=False).native_loop_why
        quantize(model, "w2g16-rot", progress=False)  # 2-bit codes behind a rotation
        rt = DecoderRuntime(model, dtype=torch.float32)
    assert rt.native_loop_why.startswith("layer 0 q_proj: ")
    assert "native loop:" in rt.decode_path
    with pytest.raises(ValueError, match="'float', 'int8'"):
        DecoderRuntime(tiny(), dtype=torch.float32, activations="int4")


def test_a_prompt_past_the_cache_is_a_clear_error() -> None:
    with native.force(True):
        rt = DecoderRuntime(tiny(), dtype=torch.float32)
    with pytest.raises(ValueError, match="past the cache length 4"):
        rt.prefill(ids(length=6), max_len=4)
    rt.prefill(ids(length=6), max_len=7)
    rt.decode(ids(length=1))
    with pytest.raises(RuntimeError, match="KV cache full"):
        rt.decode(ids(length=1))
    with pytest.raises(ValueError, match="past the KV cache"):
        rt._native_loop(ids(length=1), 7)


# ---- kernels against float64 references -------------------------------------------------
def _apply(desc: nl.LbLinear, x: torch.Tensor, q8: bool) -> torch.Tensor:
    y = torch.empty(desc.n)
    nl._lib().lowbit_linear_apply(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), int(q8))
    return y


def _q8(x: torch.Tensor) -> torch.Tensor:
    """Q8_0's quantization of x (blocks of 32), dequantized: what the int8 path multiplies."""
    k = x.numel()
    xb = torch.nn.functional.pad(x, (0, (-k) % 32)).view(-1, 32)
    d = xb.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return ((xb * inv).round() * d).reshape(-1)[:k]


def test_q8_quantize_is_q8_0_bit_for_bit() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(3)) * 4
    buf = torch.zeros(nl._lib().lowbit_q8_floats(100))  # lowbit_q8_carve's layout, kp = 128
    nl._lib().lowbit_q8_quantize(x.data_ptr(), 100, buf.data_ptr())
    xq, dl, dls = buf[:32].view(torch.int8), buf[32:64], buf[64:96]
    n8, n128 = buf[96:128].view(torch.int32), buf[128:160].view(torch.int32)
    got = (xq.float() * dl.repeat_interleave(4))[:100]
    assert torch.equal(got, _q8(x))
    ls = xq.view(32, 4).int().sum(1, dtype=torch.int32)
    assert torch.equal(n8, -8 * ls) and torch.equal(n128, -128 * ls)
    assert torch.equal(dls, dl * ls.float())
    # per block of 32 (the tile kernels): scale, scale x code sum, -8 and -128 x code sum
    bd, bds = buf[160:164], buf[164:168]
    bn8, bn128 = buf[168:172].view(torch.int32), buf[172:176].view(torch.int32)
    bs = xq.view(4, 32).int().sum(1, dtype=torch.int32)
    assert torch.equal(bd, dl[::8]) and torch.equal(bds, bd * bs.float())
    assert torch.equal(bn8, -8 * bs) and torch.equal(bn128, -128 * bs)


def _layer(n: int, k: int, recipe: str):
    from lowbit import quantize

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=True))
    if recipe != "float":
        quantize(model, recipe, progress=False)
    return model[0]


def _lut4q_weight(layer, n: int, k: int) -> torch.Tensor:
    """The float64 weight of ``LB_LUT4Q`` (``T16[u] * s`` per row and group), from its
    int16 byte planes and scales, decoded here independently of the kernel."""
    codes, table, scales, kg, per_row = native_layouts.lut4(layer, layer.backend.name, layer._state)
    kp = codes.shape[1] * 2
    groups = -(-kp // kg)
    planes, s = native_layouts.lut4q(table, scales, n, groups)
    t16 = (planes[:, :16].int() | (planes[:, 16:].int() << 8)).to(torch.int16).double()
    c = codes.view(n, kp // 32, 16)
    u = torch.stack([c & 15, c >> 4], 2).reshape(n, kp).long()  # byte j: inputs j, j + 16
    g = torch.arange(kp) // kg
    rows = torch.arange(n)[:, None]
    vals = t16[rows * groups + g, u] if per_row else t16[0][u]
    return (vals * s.double()[rows, g])[:, :k]


@pytest.mark.parametrize("recipe,kind", [("float", nl.F32), ("w8", nl.I8), ("w4g32", nl.I4T),
                                         ("gguf:q4_0", nl.I4T), ("gguf:q8_0", nl.I8G),
                                         ("nf4g64", nl.LUT4), ("kmeans4", nl.LUT4),
                                         ("gguf:iq4_nl", nl.LUT4)])
@pytest.mark.parametrize("n,k", [(37, 96), (64, 576)])
def test_each_layout_against_its_float64_weight(recipe: str, kind: int, n: int, k: int) -> None:
    layer = _layer(n, k, recipe)
    with native.force(True):
        desc, _keep = nl.linear_descriptor(layer, k, q8=False)
    assert desc.kind == kind
    w = (layer.weight if recipe == "float" else layer.dequantize_weight()).double()
    if kind == nl.I4T:  # the kernel's bf16 scales are its weights
        from lowbit.kernels.int4_weight import dequantize_int4_weight

        w = dequantize_int4_weight(layer._state[0]).double()
    x = torch.randn(k, generator=torch.Generator().manual_seed(1))
    b = layer.bias.double()
    tol = 2e-3 if kind == nl.I4T else 1e-5  # I4T rounds activations to int16 (gemv_avx2.c)
    want = w @ x.double() + b
    torch.testing.assert_close(_apply(desc, x, False).double(), want, atol=tol, rtol=tol)
    if kind == nl.F32:
        return
    # the int8-activation layouts: 16-row tiles on VNNI (IQ4_NL's integer table too), row-major
    # on AVX2; a tile layout run where VNNI is off takes its scalar reference (q8_tiles.c)
    tiled = {nl.I4T: nl.Q4C, nl.I8: nl.I8C, nl.I8G: nl.I8C}
    if recipe == "gguf:iq4_nl":
        tiled[nl.LUT4] = nl.L4C
    rowwise = {nl.I4T: nl.Q4R, nl.LUT4: nl.LUT4Q}
    for isa in ("vnni", "avx2") if nl.has_vnni() else ("avx2",):
        with nl.avx2_only() if isa == "avx2" else contextlib.nullcontext():
            desc, _keep = nl.linear_descriptor(layer, k, q8=True)
            layouts = {**rowwise, **tiled} if isa == "vnni" else rowwise
            assert desc.kind == layouts.get(kind, kind)
            got = _apply(desc, x, True).double()
        wq = w
        if desc.kind == nl.LUT4Q:  # the kernel's int16 tables are its weights, within 2^-16
            wq = _lut4q_weight(layer, n, k)
            assert (wq - w).abs().max() <= 2.0**-16 * w.abs().max()
        want = wq @ _q8(x).double() + b
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=isa)
        if desc.kind in (nl.Q4C, nl.I8C, nl.L4C):
            with nl.avx2_only():
                ref = _apply(desc, x, True).double()
            torch.testing.assert_close(ref, got, atol=1e-6, rtol=1e-6, msg="tile reference")


@pytest.mark.real_model
def test_smollm2_greedy_tokens_match() -> None:
    import lowbit

    model = lowbit.load_model("smollm2-135m")
    lowbit.quantize(model, "w8", progress=False)
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216]])
    with native.force(True):
        loop = DecoderRuntime(model, dtype=torch.float32)
        got_tokens, got = _greedy_logits(loop, x, 64)
        want_tokens, want = _greedy_logits(DecoderRuntime(model, dtype=torch.float32,
                                                          native=False), x, 64)
    assert loop.decode_path.startswith("native loop")
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("recipe", ["w8a8-plain", "w8a8"])
@pytest.mark.parametrize("n,k", [(37, 96), (64, 576)])
def test_w8a8_layout_against_its_float64_math(recipe: str, n: int, k: int) -> None:
    """LB_W8A8 (VNNI where present, else the AVX2 loop; the loop's activation setting does
    not apply): the input rotated when the layer rotates it, codes round(x / s) with
    s = max|x| / 127, the int8 sum exact, then s * s_w + b."""
    from lowbit.formats.rotation import rotate

    layer = _layer(n, k, recipe)
    x = torch.randn(k, generator=torch.Generator().manual_seed(2))
    xr = rotate(x.double(), layer.spec.rotation).float() if layer.spec.rotation else x
    s = xr.abs().max() / 127
    codes = torch.round(xr / s).clamp(-127, 127).double()
    kern = layer._state[0]
    want = (kern.qdata.double() @ codes) * s.double() * kern.scale.double() + layer.bias.double()
    for q8 in (False, True):
        desc, _keep = nl.linear_descriptor(layer, k, q8=q8)
        assert desc.kind == nl.W8A8 and bool(desc.nf) == (recipe == "w8a8")
        torch.testing.assert_close(_apply(desc, x, q8).double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["w4g32-gptq-rot", "w8a8", "w8a8-plain", "w8a8-static-rot"])
def test_prefill_groups_share_their_input(recipe: str) -> None:
    """q/k/v and gate/up read one rotated input in prefill (W8A8: one set of codes, made in
    C): bit for bit what each layer computes on its own for a weight-only recipe and an
    unrotated W8A8 one; with a rotated W8A8 input, whose C rotation sums in another order,
    within 2% of the logit range."""
    model, x = _model("llama", recipe), ids(length=40)
    with native.force(True):
        rt = DecoderRuntime(model, dtype=torch.float32)
        got = rt.prefill(x, all_logits=True)
        for b in rt.blocks:  # every layer on its own input, as module(x) does
            b.prefill_qkv = lambda h, b=b: [b.q(h), b.k(h), b.v(h)]
            b.prefill_gu = lambda h, b=b: [b.gate(h), b.up(h)]
            b.prefill_o, b.prefill_down = (lambda a, b=b: [b.o(a)]), (lambda m, b=b: [b.down(m)])
        want = rt.prefill(x, all_logits=True)
    if recipe in ("w4g32-gptq-rot", "w8a8-plain"):
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= 0.02 * (want.max() - want.min())
