"""Calibrated quantization block by block: every algorithm end to end on a tiny Llama,
scale folding is exact, storage round-trips, and bad input gets clear errors."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from lowbit.algorithms import AlgorithmError, HessianAccumulator, InputStats
from lowbit.algorithms.group import Member, solve_group
from lowbit.formats import Granularity
from lowbit.model import Recipe, RecipeError, load, quantize, save
from lowbit.model.arch import resolve_arch
from lowbit.model.pipeline import quantize_model
from lowbit.model.runner import _Run
from lowbit.nn import QuantizedLinear

from .tiny import tiny_llama

torch.set_num_threads(1)




@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(9))


def _kl(model, base, ids):
    with torch.no_grad():
        ref = base(ids).logits.float().log_softmax(-1)
        out = model(ids).logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).mean().item()


def _quantized(base, recipe, calib, **kw):
    model = copy.deepcopy(base)
    quantize(model, Recipe.parse(recipe), calib, progress=False, **kw)
    return model


@pytest.mark.parametrize("recipe,kernel", [
    ("w4g32-gptq", "int4_weight."), ("w4g32-awq", "int4_weight."),
    ("w4g32-imatrix", "int4_weight."), ("w2g16-hqq", "dequant+F.linear"),
    ("kmeans4", "codebook+F.linear"), ("w8a8-smooth", "int8_static."),
])
def test_every_algorithm_quantizes_every_linear(base, calib, ids, recipe, kernel):
    model = _quantized(base, recipe, calib)
    summary = model.lowbit_summary
    assert summary.layers == 15  # 2 x 7 + lm_head
    # the decode kernel (the prefill one, after " | ", depends on the CPU)
    block = model.model.layers[1].mlp.down_proj
    assert block.kernel.split(" | ")[0].startswith(kernel)
    # below 6 bits the presets' head rule gives the head int8 per channel
    head = model.lm_head.spec
    assert (head.format, head.granularity) == (("int8", Granularity.per_channel(0))
                                               if "w8" not in recipe
                                               else (block.spec.format, block.spec.granularity))
    assert summary.bytes_after < summary.bytes_before / 3
    assert _kl(model, base, ids) < 0.1
    info = model.lowbit_calibration["layers"]["model.layers.1.mlp.down_proj"]
    assert info["algorithm"] == {"w4g32-imatrix": "importance", "w8a8-smooth": "smoothquant",
                                 "kmeans4": "kmeans"}.get(recipe, recipe.split("-")[-1])


def test_calibrated_beats_rtn_at_3_bits(base, calib, ids):
    rtn = _kl(_quantized(base, "w3g32", calib), base, ids)
    for recipe in ("w3g32-gptq", "w3g32-awq", "w3g32-imatrix"):
        assert _kl(_quantized(base, recipe, calib), base, ids) < rtn, recipe


def test_sequential_and_one_pass_orders_both_work(base, calib, ids):
    one = copy.deepcopy(base)

    quantize_model(one, "w4g32-gptq", calib, progress=False, sequential=False)
    seq = _quantized(base, "w4g32-gptq", calib)
    assert _kl(one, base, ids) < 0.05 and _kl(seq, base, ids) < 0.05


def test_scale_folding_is_exact(base, ids):
    """``(W diag(s)) (diag(s)^-1 x)``: folding 1/s into the norm (or the rows of up_proj) and s
    into the readers' columns leaves the float model unchanged."""
    model = copy.deepcopy(base)
    arch = resolve_arch(model)
    run = _Run(model, {}, None, 0)
    g = torch.Generator().manual_seed(3)
    for group in (arch.blocks[0].groups[0], arch.blocks[1].groups[3]):
        width = model.get_submodule(group.linears[0]).in_features
        s = torch.rand(width, generator=g) + 0.5
        with torch.no_grad():
            run.fold(group, 1 / s)
            for name in group.linears:
                model.get_submodule(name).weight.mul_(s)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)


def test_folding_into_a_quantized_feeder_rescales_its_rows(base, calib):
    model = copy.deepcopy(base)
    quantize(model, "w4g32-awq", calib, progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantizedLinear)
    info = model.lowbit_calibration["layers"]["model.layers.0.mlp.down_proj"]
    assert "awq_alpha" in info  # down_proj's scale was searched and folded into up_proj


def test_hqq_float_zero_points_and_codebooks_survive_save_load(base, tmp_path, ids):
    for recipe in ("w2g16-hqq", "kmeans4", "w4g128-hqq"):
        model = _quantized(base, recipe, None)
        layer = model.model.layers[0].self_attn.q_proj
        if "hqq" in recipe:
            assert layer.packed_weight().qparams.zero_point.dtype == torch.float16
        else:
            assert layer.packed_weight().qparams.scale.shape == (64, 16)  # 16 centroids a row
        save(model, tmp_path / recipe)
        again = load(tmp_path / recipe)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits), recipe
        w = again.model.layers[0].self_attn.q_proj
        assert torch.equal(w.dequantize_weight(), layer.dequantize_weight())
        x = torch.randn(3, 64)
        assert torch.allclose(w(x), w(x, impl="reference"), atol=2e-2)


def test_smoothquant_static_close_to_float(base, calib, ids):
    model = _quantized(base, "w8a8-smooth", calib)
    info = model.lowbit_calibration["layers"]
    assert any(v.get("smooth_alpha") is not None for v in info.values())
    assert _kl(model, base, ids) < 5e-3


def test_smoothquant_then_rotation(base, calib, ids):
    """w8a8-smooth-rot: SmoothQuant's scales folded into the feeders, then each layer
    rotates its smoothed input; a width without a Hadamard matrix (160) stays unrotated and
    is listed. The fast path equals the reference and the model stays close to float."""
    with pytest.warns(UserWarning, match="no Hadamard rotation of size 160"):
        model = _quantized(base, "w8a8-smooth-rot", calib)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.spec.rotation == "hadamard"
    assert layers[0].mlp.down_proj.spec.rotation is None
    assert "model.layers.0.mlp.down_proj" in model.lowbit_summary.unrotated
    q = layers[1].mlp.gate_proj
    x = torch.randn(5, q.in_features)
    assert torch.allclose(q(x).float(), q(x, impl="reference").float(), atol=1e-3, rtol=1e-3)
    assert _kl(model, base, ids) < 5e-3


def test_token_sample_keeps_the_largest_rows():
    """A static range is set by rare massive tokens: the sample holds them."""
    stats = InputStats(8, {"sample"}, sample_per_batch=2)
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    x[617] *= 100
    stats.add(x)
    assert stats.sample().abs().max() == x.abs().max()
    assert len(stats.sample()) <= 2 + 8


# -- bad input ---------------------------------------------------------------------------
def test_calibrated_recipe_without_data(base):
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize(copy.deepcopy(base), "w4g32-gptq", progress=False)


def test_too_little_calibration_data(base):
    few = [torch.randint(0, 128, (1, 16))]
    with pytest.raises(RecipeError, match="too little calibration data.*down_proj.*160x160"):
        quantize(copy.deepcopy(base), "w4g32-gptq", few, progress=False)


def _member(w, **options):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    scheme = Recipe.parse("w4g32-gptq").default
    return Member("model.layers.7.mlp.up_proj", lin, replace(scheme, options=options))


def test_singular_hessian_escalates_damping_then_errors():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    member = _member(W, percdamp=0.0, hessian_shrink=0.0)  # shrinking alone would make it definite
    stats = InputStats(32, {"hessian"})
    stats.add(torch.randn(4, 1) * torch.randn(1, 32))  # rank 1: singular but usable
    sol = solve_group([member], stats, None)[0]
    assert sol.info["percdamp"] > 0  # escalated from 0
    bad = InputStats(32, {"hessian"})
    bad.hessian = HessianAccumulator(32)
    bad.hessian.add_batch(torch.randn(64, 32))
    bad.hessian.H -= 10 * torch.eye(32) * bad.hessian.H.diagonal().mean()  # indefinite
    with pytest.raises(AlgorithmError, match="model.layers.7.mlp.up_proj.*not positive definite"):
        solve_group([_member(W, max_percdamp=0.1)], bad, None)


def test_static_activations_outside_the_blocks_are_refused(calib):
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.extra = inner, nn.Linear(128, 128)

        def forward(self, input_ids, **kw):
            return self.extra(self.inner(input_ids, **kw).logits)

    model = Wrapped(tiny_llama(hidden=64))
    with pytest.raises(RecipeError, match="lies outside the model's blocks.*with_keep"):
        quantize(model, "w8a8-smooth", calib, progress=False)


def test_codebook_format_needs_kmeans(base):
    from lowbit.model import Scheme
    from lowbit.nn import WeightSpec

    with pytest.raises(RecipeError, match="k-means"):  # refused when the recipe is built
        Scheme(WeightSpec("codebook4", "channel"), algorithm="hqq")


def test_awq_scales_then_gptq(base, calib, ids):
    """``awq+gptq``: the group's AWQ scale is searched and folded, then GPTQ quantizes
    ``W diag(s)`` against the scaled Hessian; it is at least as close as RTN at 3 bits."""
    model = _quantized(base, "w3g32-awq+gptq", calib)
    info = model.lowbit_calibration["layers"]["model.layers.1.mlp.down_proj"]
    assert info["algorithm"] == "gptq" and "awq_alpha" in info
    assert _kl(model, base, ids) < _kl(_quantized(base, "w3g32", calib), base, ids)


@pytest.mark.parametrize("recipe", ["w8", "w4g32-gptq"])
def test_float_weights_are_freed_as_layers_are_packed(base, calib, monkeypatch, recipe):
    """Once a layer (RTN) or a block (calibrated) is packed nothing may keep its float
    weight alive: the peak memory of quantizing a model in place depends on it."""
    import gc
    import sys
    import weakref

    quantize_module = sys.modules["lowbit.model.pipeline"]

    model = copy.deepcopy(base)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    refs = {n: weakref.ref(model.get_submodule(n).weight) for n in names}
    alive_at = []
    real = quantize_module._set_module

    def spy(root, name, module):
        real(root, name, module)
        if isinstance(module, QuantizedLinear) and name in refs:
            gc.collect()
            alive_at.append((name, [n for n, r in refs.items() if r() is not None]))

    monkeypatch.setattr(quantize_module, "_set_module", spy)
    import lowbit.model.runner as runner_module

    monkeypatch.setattr(runner_module, "_set_module", spy)
    quantize(model, recipe, calib, progress=False)
    placed = [n for n, _ in alive_at]
    assert placed and set(placed) == set(names)
    for i, (name, alive) in enumerate(alive_at):
        block = name.split(".")[2]
        earlier = {n for n in placed[:i] if n.split(".")[2] != block}  # other, earlier blocks
        assert not earlier & set(alive), f"{sorted(earlier & set(alive))} still alive at {name}"
    assert all(r() is None for r in refs.values())


def test_block_inputs_are_held_in_half_precision_while_they_fit(base, calib, ids):
    """The stored block inputs (the largest buffer) are float16 between blocks, unless an
    row is non-finite; the result is as close to the float model as with float32."""
    from lowbit.model import runner

    held = []
    real = runner._hold

    def spy(h, half):
        out = real(h, half)
        held.append(out.dtype)
        return out

    runner._hold, saved = spy, runner._hold
    # the head at 4 bits too (no int8 head rule), so the KL is large enough to compare
    recipe = replace(Recipe.parse("w4g32-gptq"), rules=())
    try:
        half = _quantized(base, recipe, calib)
        assert held and set(held) == {torch.float16}
        held.clear()
        full = copy.deepcopy(base)
        quantize_model(full, recipe, calib, progress=False, half_inputs=False)
        assert held and set(held) == {torch.float32}
    finally:
        runner._hold = saved
    assert abs(_kl(half, base, ids) - _kl(full, base, ids)) < 0.1 * _kl(full, base, ids)
    nan = torch.tensor([1.0, float("nan")])
    assert runner._hold(nan, True).dtype == torch.float32  # kept as it is
    assert runner._hold(torch.ones(3), True).dtype == torch.float16


def test_rows_past_the_half_limit_are_held_scaled_in_half_precision():
    """Rows with "massive activations" are held in float16 divided by a power of two: half
    the bytes of float32, and the same 2^-11 relative rounding as the other rows."""
    from lowbit.model import calib_memory

    torch.manual_seed(0)
    h = torch.randn(2, 64, 96)
    h[0, 5, 7] = 9.0 * calib_memory.HALF_LIMIT  # one token with a huge entry
    h[1, 9, 0] = -70000.0  # past float16's range
    held = calib_memory._hold(h, True)
    assert isinstance(held, calib_memory.ScaledHalf) and held.dtype == torch.float16
    assert held.half.element_size() * held.half.numel() == h.numel() * 2
    assert held.half.abs().amax() <= calib_memory.HALF_LIMIT
    assert set(held.scale.unique().tolist()) == {1.0, 16.0, 8.0}  # only the two big rows
    back = calib_memory._restore(held, torch.float32)
    rel = ((back - h).abs() / h.abs().clamp_min(1e-3)).amax()
    assert back.dtype == torch.float32 and rel <= 2.0**-11
    assert torch.equal(calib_memory._restore(h.half(), torch.float32), h.half().float())


def test_gptq_in_a_rotated_basis_on_heavy_tailed_weights():
    """GPTQ on ``(W R, R^T H R)`` minimises the same objective ``tr(dW H dW^T)`` as on
    ``(W, H)``; on weights with a few large entries (as in LLMs) the rotation spreads them
    over every group, so the error in the original basis falls (2-3.5x here)."""
    from lowbit.algorithms import gptq
    from lowbit.algorithms.stats import rotate_weight_and_hessian
    from lowbit.formats import WeightSpec, dequantize, rotate

    cfg = WeightSpec("uint3", "group:32", False, "bf16", False)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(64, 96, generator=g)
        W.view(-1)[torch.randperm(W.numel(), generator=g)[:40]] *= 15
        X = torch.randn(1000, 96, generator=g) * torch.rand(96, generator=g).add(0.2)
        H = 2 * X.T @ X / 1000
        Wr, Hr = rotate_weight_and_hessian(W, H, "hadamard")
        assert torch.allclose(Wr @ Hr @ Wr.T, W @ H @ W.T, rtol=1e-4, atol=1e-2)

        def error(w_hat, W=W, H=H):
            d = W - w_hat
            return float(torch.trace(d @ H @ d.T))

        plain = gptq(W, H, cfg, act_order=True)
        rotated = gptq(Wr, Hr, cfg, act_order=True)
        back = rotate(dequantize(rotated.codes, rotated.qparams).double(), "hadamard",
                      inverse=True).float()
        assert error(back) < 0.6 * error(dequantize(plain.codes, plain.qparams)), seed


def test_rotated_recipes_end_to_end(calib, ids, tmp_path):
    """``-rot`` with GPTQ and AWQ+GPTQ: every layer rotates its input (widths 48 and 128
    have Hadamard matrices), AWQ's scale is searched in the rotated basis, the model stays
    close to float (a rotation applied to one side only gives KL > 1), saves, loads and
    keeps its rotation; AWQ alone is refused. (On this tiny random model every 3-bit
    recipe is within noise of another: the heavy-tailed test above measures the gain.)"""
    base = tiny_llama(hidden=48)
    for recipe in ("w3g16-gptq-rot", "w3g16-awq+gptq-rot"):
        model = _quantized(base, recipe, calib)
        q = model.model.layers[1].self_attn.q_proj
        assert q.spec.rotation == model.model.layers[0].mlp.down_proj.spec.rotation == "hadamard"
        info = model.lowbit_calibration["layers"]["model.layers.1.self_attn.q_proj"]
        assert info["algorithm"] == "gptq" and ("awq_alpha" in info) == ("awq" in recipe)
        assert _kl(model, base, ids) < 2e-3, recipe
    save(model, tmp_path / "rot")
    again = load(tmp_path / "rot")
    assert again.model.layers[1].self_attn.q_proj.spec.rotation == "hadamard"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(RecipeError, match="rotation runs with"):
        Recipe.parse("w4g32-awq-rot")


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_free_heap_pages_go_back_to_the_os():
    """Once glibc's mmap threshold has risen (after the first few-MB tensor is freed), tensors
    of that size come from the heap and their pages stay resident after ``del``;
    ``_give_back_free_memory`` (``malloc_trim``) returns them."""
    from lowbit.model import calib_memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    assert calib_memory._malloc_trim() is not None
    first = torch.ones(300_000)  # 1.2 MB: mapped, and freeing it raises the threshold
    del first
    base = rss_mb()
    many = [torch.ones(300_000) for _ in range(200)]  # 240 MB from the heap
    top = torch.ones(300_000)  # a live block above them: plain free cannot shrink the heap
    del many
    after_free = rss_mb()
    calib_memory._give_back_free_memory()
    after_trim = rss_mb()
    assert after_free - base > 150  # the pages stayed resident...
    assert after_free - after_trim > 150  # ...until trimmed
    del top
