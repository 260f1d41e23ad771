"""Fake-quant modules: STE gradients, LSQ / LSQ+ gradients, observers, gradient-path errors."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats import compute_qparams, dequantize, quantize
from lowbit.nn.fake_quant import (
    FakeQuantError,
    FakeQuantizer,
    FakeQuantLinear,
    QuantizerSpec,
    lsq_fake_quantize,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ste_gradient_is_identity_inside_range_and_zero_where_clipped():
    torch.manual_seed(0)
    w = torch.randn(8, 16, requires_grad=True)
    q = FakeQuantizer.for_weight(QuantizerSpec("int4", "channel"), w)
    q(w).sum().backward()
    # min/max range: nothing clips (formats.fake_quantize splits the gradient of the one
    # element that sits exactly on the range's end, so leave those out)
    ends = w.detach().abs() == w.detach().abs().amax(1, keepdim=True)
    assert torch.equal(w.grad[~ends], torch.ones_like(w)[~ends])
    w.grad = None
    q.clip_ratio.fill_(0.5)
    q(w).sum().backward()
    lo = (w.detach().abs().amax(1, keepdim=True) * 0.5)
    scale = lo / 7
    inside = (w.detach() >= -8 * scale) & (w.detach() <= 7 * scale)
    assert torch.equal(w.grad, inside.float())


def test_fake_quant_forward_equals_dequantized_codes():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    for spec in [QuantizerSpec("int8"), QuantizerSpec("uint4", "group:16", symmetric=False),
                 QuantizerSpec("nf4", "group:8"), QuantizerSpec("fp8_e4m3", "tensor"),
                 QuantizerSpec("ternary"), QuantizerSpec("binary")]:
        q = FakeQuantizer.for_weight(spec, w)
        codes, qp = q.quantize_weight(w)
        assert torch.allclose(q(w), dequantize(codes, qp), rtol=0, atol=1e-6), spec.format


def _lsq_reference_grad(x, s, qmin, qmax, g, upstream):
    """Esser et al. (2020), eq. 3, times the gradient scale g."""
    v = x / s
    local = torch.where(v <= qmin, torch.full_like(v, qmin),
                        torch.where(v >= qmax, torch.full_like(v, qmax), torch.round(v) - v))
    return (upstream * local).sum() * g


@pytest.mark.parametrize("fmt,qmin,qmax", [("int4", -8, 7), ("int2", -2, 1)])
def test_lsq_scale_gradient_matches_eq3(fmt, qmin, qmax):
    torch.manual_seed(1)
    x = torch.randn(200) * 2
    s = torch.tensor(0.3, requires_grad=True)
    upstream = torch.randn(200)
    spec = QuantizerSpec(fmt, "tensor", learnable="lsq")
    g = 1 / (200 * qmax) ** 0.5
    out = lsq_fake_quantize(x, s, None, spec, g)
    (out * upstream).sum().backward()
    expected = _lsq_reference_grad(x, 0.3, qmin, qmax, g, upstream)
    assert torch.allclose(s.grad, expected, rtol=1e-4, atol=1e-6)
    # the forward pass is the plain quantizer with that scale
    qp = compute_qparams(torch.tensor([0.3 * qmax]), fmt, "tensor")
    assert torch.allclose(out, dequantize(quantize(x, qp), qp), atol=1e-6)


def test_lsq_plus_offset_gradient():
    """LSQ+ (Bhalgat et al., 2020): the offset's gradient is 0 inside the range and
    -s * g per element clipped (here written as the zero-point z, beta = -s z)."""
    x = torch.tensor([-5.0, -0.2, 0.1, 0.4, 9.0])
    s = torch.tensor(0.1, requires_grad=True)
    z = torch.tensor(3.0, requires_grad=True)
    spec = QuantizerSpec("uint3", "tensor", symmetric=False, learnable="lsq+")
    lsq_fake_quantize(x, s, z, spec, g=1.0).sum().backward()
    clipped = 2  # -5 -> below 0 after the offset, 9 -> above 7
    assert torch.allclose(z.grad, torch.tensor(-0.1 * clipped))


def test_learnable_scale_on_float_and_lookup_grids():
    torch.manual_seed(0)
    w = torch.randn(4, 32, requires_grad=True)
    for fmt, gran in [("fp8_e4m3", "channel"), ("nf4", "group:16"), ("binary", "channel")]:
        q = FakeQuantizer.for_weight(QuantizerSpec(fmt, gran, learnable="lsq"), w)
        q(w).pow(2).sum().backward()
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all(), fmt
        assert q.scale.grad.abs().sum() > 0, fmt


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "mxfp4", "granularity": "group:32", "learnable": "lsq"}, "no gradient path"),
    ({"format": "int4", "scale_dtype": "e8m0", "learnable": "lsq"}, "no gradient path"),
    ({"format": "nf4", "symmetric": False, "learnable": "lsq+"}, "no zero-point"),
    ({"format": "ternary", "symmetric": False, "learnable": "lsq+"}, "no zero-point"),
    ({"format": "fp16"}, "MixedPrecision"),
    ({"format": "int8", "dynamic": True, "learnable": "lsq"}, "cannot be learned"),
    ({"format": "int8", "learnable": "lsq+"}, "symmetric=False"),
])
def test_format_without_gradient_path_is_a_clear_error(kwargs, match):
    with pytest.raises(FakeQuantError, match=match):
        QuantizerSpec(**kwargs)


def test_mx_format_without_learnable_scale_trains():
    w = torch.randn(4, 64, requires_grad=True)
    q = FakeQuantizer.for_weight(QuantizerSpec("mxfp4", "group:32", scale_dtype="e8m0"), w)
    q(w).sum().backward()
    assert w.grad is not None


def test_static_activation_observer_freezes_after_n_steps():
    spec = QuantizerSpec("int8", "tensor", freeze_after=3)
    q = FakeQuantizer(spec).train()
    with pytest.raises(FakeQuantError, match="observed no data"):
        q.eval()(torch.randn(4))
    q.train()
    for i in range(3):
        q(torch.full((4,), float(i + 1)))
    assert q.frozen and float(q.max_val) == 3.0
    q(torch.full((4,), 100.0))  # frozen: the range no longer moves
    assert float(q.max_val) == 3.0 and int(q.step) == 3
    assert q.qparams().scale.item() == pytest.approx(3.0 / 127)


def test_learnable_activation_scale_starts_from_the_observer():
    q = FakeQuantizer(QuantizerSpec("int8", "tensor", learnable="lsq", freeze_after=2)).train()
    q(torch.linspace(-2, 2, 10))
    q(torch.linspace(-4, 4, 10))
    assert q.scale.item() == pytest.approx(4.0 / 127)
    x = torch.randn(3, 10)
    q(x).sum().backward()
    assert q.scale.grad is not None


def test_fake_quant_linear_shares_parameters_and_lora_merges():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    fq = FakeQuantLinear.from_linear(lin, QuantizerSpec("int8"), lora_rank=2)
    assert fq.weight is lin.weight and fq.bias is lin.bias
    x = torch.randn(3, 16)
    codes, qp = fq.quantized_weight()
    assert torch.allclose(fq(x), F.linear(x, dequantize(codes, qp), lin.bias), atol=1e-6)
    fq(x).sum().backward()
    assert fq.lora_b.grad is not None and fq.lora_b.grad.abs().sum() > 0
