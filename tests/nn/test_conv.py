"""QuantizedConv2d: fast path vs im2col reference, real bytes, state dict round trip."""

import pytest
import torch
from torch import nn

from lowbit.formats import compute_qparams, dequantize, quantize
from lowbit.nn import ModuleError, WeightSpec
from lowbit.nn.conv import QuantizedConv2d


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CONVS = [
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0), groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, dilation=2, padding="same"),
]
SPECS = [WeightSpec("int8", "channel"), WeightSpec("uint4", "group:8", False, "bf16"),
         WeightSpec("ternary", "channel"), WeightSpec("nf4", "group:4")]


@pytest.mark.parametrize("geometry", CONVS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.format)
def test_fast_path_matches_reference(geometry, spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(**geometry)
    q = QuantizedConv2d.from_float(conv, spec)
    x = torch.randn(2, geometry["in_channels"], 9, 10)
    fast, ref = q(x), q(x, impl="reference")
    assert fast.shape == conv(x).shape
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    # the reference equals a float convolution with the dequantized weight
    same = nn.functional.conv2d(x, q.dequantize_weight(), q.bias, conv.stride, conv.padding,
                                conv.dilation, conv.groups)
    assert torch.allclose(ref, same, atol=1e-5)


def test_codes_are_the_formats_codes_and_bytes_shrink():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    q = QuantizedConv2d.from_float(conv, WeightSpec("int4", "channel"))
    w2 = conv.weight.detach().reshape(32, -1)
    qp = compute_qparams(w2, "int4", "channel")
    assert torch.equal(q.packed_weight().codes(), quantize(w2, qp))
    assert torch.allclose(q.dequantize_weight().reshape(32, -1), dequantize(quantize(w2, qp), qp))
    float_bytes = conv.weight.numel() * 4
    assert q.weight_nbytes() == 32 * 72 + 32 * 4  # 4-bit codes + one fp32 scale per channel
    assert q.weight_nbytes() < float_bytes / 6
    buffers = sum(b.numel() * b.element_size() for b in q.buffers())
    assert buffers == q.weight_nbytes() + 32 * 4  # + bias


def test_state_dict_round_trip_and_dtype_moves():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    spec = WeightSpec("uint4", "group:9", False, "bf16")
    q = QuantizedConv2d.from_float(conv, spec)
    other = QuantizedConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), spec)
    other.load_state_dict(q.state_dict())
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(other(x), q(x))
    q.to(torch.bfloat16)  # codes and scales keep the dtypes of their format
    assert q.qdata.dtype == torch.uint8 and q.scale.dtype == torch.bfloat16
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_manifest_round_trip():
    import json

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), groups=2)
    q = QuantizedConv2d.from_float(conv, WeightSpec("uint4", "group:4", False))
    entry = json.loads(json.dumps(q.manifest_entry()))
    again = QuantizedConv2d.from_manifest(entry, dict(q.state_dict()))
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(again(x), q(x))


def test_shape_errors():
    conv = nn.Conv2d(3, 4, 3)
    q = QuantizedConv2d.from_float(conv, WeightSpec("int8"))
    with pytest.raises(ModuleError, match="input must be"):
        q(torch.randn(1, 5, 6, 6), impl="reference")
    w = torch.randn(4, 10)
    qp = compute_qparams(w, "int8", "channel")
    with pytest.raises(ModuleError, match="needs 4x27"):
        QuantizedConv2d.from_codes(quantize(w, qp), qp, WeightSpec("int8"), None,
                                   in_channels=3, out_channels=4, kernel_size=3)
