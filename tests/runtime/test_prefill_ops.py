"""The prefill's small operations in C (``runtime.prefill_ops.NativeOps``) against torch's
(``TorchOps``, the reference), and which of the two a runtime picks."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lowbit.kernels import native
from lowbit.runtime import DecoderRuntime
from lowbit.runtime.prefill_ops import NativeOps, TorchOps, prefill_ops
from tests.runtime.test_decoder import tiny

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernels unavailable: {native.why_unavailable()}")


@pytest.mark.parametrize("rows", [3, 200])  # inline and split over the threads
def test_native_ops_match_torch(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    c, t = NativeOps(None), TorchOps(F.silu)
    x, d = torch.randn(rows, 72, generator=gen), torch.randn(rows, 72, generator=gen)
    w = torch.rand(72, generator=gen) + 0.5
    torch.testing.assert_close(c.norm(x, w, 1e-5), t.norm(x, w, 1e-5), atol=1e-6, rtol=1e-5)
    want_x, want_h = t.add_norm(x, d, w, 1e-6)
    got_x, got_h = c.add_norm(x, d, w, 1e-6)  # x updated in place
    assert got_x is x and torch.equal(got_x, want_x)
    torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)
    g, u = torch.randn(rows, 9000, generator=gen) * 6, torch.randn(rows, 9000, generator=gen)
    torch.testing.assert_close(c.glu(g, u), t.glu(g, u), atol=1e-6, rtol=1e-5)


def test_runtime_picks_c_only_for_float32_eager_prefill() -> None:
    model = tiny()
    assert type(prefill_ops(DecoderRuntime(model, dtype=torch.float32))) is NativeOps
    assert type(prefill_ops(DecoderRuntime(model, dtype=torch.bfloat16))) is TorchOps
    compiled = DecoderRuntime(model, dtype=torch.float32, compile_prefill=True)
    assert type(prefill_ops(compiled)) is TorchOps
    assert type(prefill_ops(DecoderRuntime(model, dtype=torch.float32, native=False))) is TorchOps
