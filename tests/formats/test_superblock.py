"""Super-block scale dtypes (llama.cpp's k-quant scales): snapping, exact recovery, checks."""

import pytest
import torch

from lowbit.formats import FormatError, WeightSpec
from lowbit.formats.scaling import snap_qparams
from lowbit.formats.superblock import QK_K, SUPER_SCALES, snap, split
from lowbit.observers.weight_clip import mse_clipped

SPECS = {"fp16*u6": WeightSpec("uint4", "group:32", False, "fp16*u6", integer_zero_point=False),
         "fp16*i8": WeightSpec("int6", "group:16", True, "fp16*i8"),
         "fp16*i6": WeightSpec("int3", "group:16", True, "fp16*i6"),
         "fp16*u4": WeightSpec("uint2", "group:16", False, "fp16*u4", integer_zero_point=False)}


def _on_grid(qp, kind):
    """(d, sc) recovered from the stored scales (and mins) of every super-block, or raise."""
    per = QK_K // qp.granularity.group_size
    s = qp.scale.double().reshape(-1, per)
    d, sc = split(s, kind.levels, kind.negative)
    assert torch.equal(d.double()[:, None] * sc.double(), s)  # d * sc exactly
    assert torch.equal(d, d.half().float()) and (sc.abs() >= 1).all()
    if qp.zero_point is not None:
        offset = qp.zero_point.double().reshape(-1, per) * s
        split(offset, kind.min_levels, False, 2.0**-20)
    return d, sc


@pytest.mark.parametrize("name", list(SUPER_SCALES))
def test_parameters_are_integers_times_one_float16_per_256_inputs(name):
    kind = SUPER_SCALES[name]
    W = torch.randn(16, 512) * torch.rand(16, 1)
    W[0, :QK_K] = 0  # a zero super-block still gets a positive scale
    qp = SPECS[name].qparams(W)
    d, sc = _on_grid(qp, kind)
    assert sc.abs().amax(1)[1:].eq(kind.levels).all()  # the largest scale uses every level
    assert (d < 0).all() == kind.negative
    again = snap_qparams(qp)  # snapping a snapped set changes nothing
    assert torch.equal(again.scale, qp.scale)


@pytest.mark.parametrize("name", list(SUPER_SCALES))
def test_moved_and_mixed_parameters_snap_back(name):
    """Refits, rescaled rows and per-group choices move scales off the grid; snap_qparams and
    the MSE clip (one call on the chosen ranges) put them back."""
    kind = SUPER_SCALES[name]
    W = torch.randn(8, 512)
    qp = SPECS[name].qparams(W)
    moved = snap_qparams(type(qp)(qp.format, qp.granularity, qp.scale * (1 + 0.3 * torch.rand(
        qp.scale.shape)), qp.zero_point, qp.scale_dtype))
    _on_grid(moved, kind)
    _on_grid(mse_clipped(W, SPECS[name])[1], kind)


def test_split_finds_the_unique_decomposition():
    d = torch.tensor([0.0123, 3.0e-6], dtype=torch.float16).double()
    q = torch.tensor([[63, 5, 1, 40], [17, 0, 2, 3]], dtype=torch.float64)
    back_d, back_q = split(d[:, None] * q, 63)
    assert torch.equal(back_d.double()[:, None] * back_q.double(), d[:, None] * q)
    with pytest.raises(FormatError, match="super-block 0"):
        split(torch.tensor([[0.1, 0.0333]], dtype=torch.float64), 63)


def test_snap_follows_the_reference_arithmetic():
    """``quantize_row_q4_K_ref``: sc = nearest(63 / max * scale), d = fp16(max / 63)."""
    scale = torch.tensor([[0.5, 0.25, 0.1, 0.0, 0.3, 0.7, 0.05, 0.2]])
    out, _ = snap(SUPER_SCALES["fp16*u6"], scale, None, 32)
    d = torch.tensor(0.7 / 63).half().float()
    sc = torch.round(63 / torch.tensor(0.7) * scale).clamp(1, 63)
    assert torch.equal(out, d * sc)


@pytest.mark.parametrize("args, match", [
    (("uint4", "group:48", False, "fp16*u6"), "dividing 256"),
    (("uint4", "channel", False, "fp16*u6"), "group:N"),
    (("int4", "group:32", True, "fp16*u6"), "unsigned"),
    (("uint4", "group:32", False, "fp16*i8"), "no min"),
    (("nf4", "group:32", True, "fp16*i8"), "integer format"),
])
def test_spec_refuses_layouts_the_grid_cannot_take(args, match):
    with pytest.raises(FormatError, match=match):
        WeightSpec(*args, integer_zero_point=False)
