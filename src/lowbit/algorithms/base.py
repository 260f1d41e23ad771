"""What every weight-quantization algorithm shares: its config, its result, the RTN
baseline and the Hessian accumulator that GPTQ-style methods read.

An algorithm takes a layer's weight ``W`` of shape ``[out, in]`` (the ``nn.Linear``
layout, so ``y = x @ W.T``) plus calibration statistics, and returns a result that holds
*codes* in the format's code dtype (same shape as ``W``) and the ``QParams`` that turn them
back into values. It never packs bytes, picks a kernel, reads a file or prints; the
scale / zero-point math is always ``lowbit.formats.scaling``.

``HessianAccumulator`` follows the reference GPTQ ``add_batch`` (Frantar et al., 2022,
section 3: the layer-wise objective ``||W X - W_hat X||^2`` has Hessian ``H = 2 X X^T``);
averaged over the ``n`` calibration tokens seen so far it is ``H = 2/n sum_t x_t x_t^T``,
updated as a running mean so batches of any size can be added in any number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import Granularity
from lowbit.formats.scaling import QParams, dequantize


class AlgorithmError(LowbitError, ValueError):
    """Input an algorithm cannot work with (bad shapes, no calibration data, singular H)."""


@dataclass
class QuantResult:
    """Codes and parameters an algorithm chose for one weight.

    ``input_scale`` (AWQ, SmoothQuant-style folding): the codes encode ``W @ diag(s)``, so
    the layer computes ``(W diag(s)) (diag(s)^-1 x)``; whoever applies the result divides
    the preceding op's output (a norm or linear) by ``s``. ``info`` holds numbers worth
    reporting (losses, the chosen alpha, the damping used).
    """

    codes: torch.Tensor
    qparams: QParams
    input_scale: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight's values (``W @ diag(s)`` when ``input_scale`` is set)."""
        return dequantize(self.codes, self.qparams, dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What replaces ``W`` in ``x @ W.T`` once the input scale is undone."""
        w = self.dequantize(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale.float()
        return w.to(dtype)


@dataclass
class CodebookResult:
    """Non-uniform (weight-sharing) result: an index per weight and a codebook per row.

    ``centroids`` has shape ``granularity.param_shape(W.shape) + (2**bits,)`` and is sorted
    ascending along its last dimension; ``codes`` (uint8, ``W``'s shape) index into it. One
    row of centroids is exactly what a lookup (codebook) format holds, with scale 1.
    """

    codes: torch.Tensor
    centroids: torch.Tensor
    granularity: Granularity
    info: dict[str, Any] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(self.codes.shape)
        k = self.centroids.shape[-1]
        idx = self.granularity.rows(self.codes.to(torch.int64))
        values = self.centroids.reshape(-1, k).float().gather(1, idx)
        return from_rows(values, shape, self.granularity).to(dtype)


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], gran: Granularity) -> torch.Tensor:
    """Inverse of ``Granularity.rows`` for the 2-D weight granularities (drops padding)."""
    if gran.kind == "group":
        return rows.reshape(shape[0], -1)[:, : shape[1]]
    return rows.reshape(shape)


def check_weight(W: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """``W`` as a finite float32 ``[out, in]`` tensor, or a clear error."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise AlgorithmError(f"{what} must be a 2-D [out, in] tensor, got {got}")
    if not W.is_floating_point():
        raise AlgorithmError(f"{what} has dtype {W.dtype}; pass a float tensor (W.float())")
    if W.numel() == 0:
        raise AlgorithmError(f"{what} is empty (shape {tuple(W.shape)})")
    if not torch.isfinite(W).all():
        raise AlgorithmError(f"{what} contains NaN or Inf; clean it before quantizing")
    return W.detach().float()


def check_inputs(
    X: torch.Tensor, in_features: int, what: str = "calibration input", finite: bool = True
) -> torch.Tensor:
    """Activations as a float32 ``[tokens, in]`` matrix (leading dims are flattened);
    ``finite=False`` skips the NaN/Inf pass (for a caller that catches them later)."""
    if not isinstance(X, torch.Tensor) or X.dim() < 1 or X.shape[-1] != in_features:
        got = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise AlgorithmError(f"{what} must have last dimension {in_features}, got {got}")
    X = X.detach().reshape(-1, in_features).float()
    if X.shape[0] == 0:
        raise AlgorithmError(f"{what} has no tokens; run calibration on some data first")
    if finite and not torch.isfinite(X).all():
        raise AlgorithmError(f"{what} contains NaN or Inf")
    return X


class HessianAccumulator:
    """Running ``H = 2/n sum_t x_t x_t^T`` over calibration tokens, as in GPTQ's ``add_batch``.

    ``H`` is symmetric, so each batch updates only its upper block triangle: row panels
    ``H[a:b, a:] += x[:, a:b]^T x[:, a:]`` (``PANELS`` of them: 62% of the full product's
    arithmetic, 0.69x its time for 1024 x 1536 batches on 2 cores); reading ``H`` mirrors
    the upper triangle into the lower after batches were added. Non-finite activations are
    caught there too, once, from ``H``'s entries (an ``inf`` or ``nan`` in ``x`` leaves one in
    ``H``), instead of by an ``isfinite`` pass over every batch. ``dtype=torch.float64``
    costs twice the memory and is steadier for long runs; the reference uses float32.
    """

    #: row panels of the upper triangle updated per batch (3-8 cost the same within noise)
    PANELS = 4
    #: below this width one full product is as fast as the panels
    MIN_PANEL_WIDTH = 256

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        if in_features < 1:
            raise AlgorithmError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self._acc = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._fresh = False  # batches added since ``H`` was last read
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold in activations ``x`` of shape ``[..., in]`` (every row is one token)."""
        x = check_inputs(x, self.in_features, "Hessian batch", finite=False)  # (see ``H``)
        x = x.to(self._acc.dtype)
        t = x.shape[0]
        keep = self.nsamples / (self.nsamples + t)
        self.nsamples += t
        alpha = 2.0 / self.nsamples
        for a, b in self._panels():  # one pass per panel, no temporary
            self._acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=keep, alpha=alpha)
        self._fresh = True

    def _panels(self) -> list[tuple[int, int]]:
        """The row ranges ``[a, b)`` of the panels (one, the whole matrix, when narrow)."""
        d = self.in_features
        step = d if d < self.MIN_PANEL_WIDTH else -(-d // self.PANELS)
        return [(a, min(d, a + step)) for a in range(0, d, step)]

    @property
    def H(self) -> torch.Tensor:
        """The symmetric ``[in, in]`` matrix (the accumulator itself: in-place edits stick)."""
        acc, d = self._acc, self.in_features
        if self._fresh and d >= self.MIN_PANEL_WIDTH:
            for a, b in self._panels():  # lower blocks := upper blocks transposed, in place
                diag = acc[a:b, a:b]
                diag.copy_(diag.triu() + diag.triu(1).mT)
                acc[b:, a:b] = acc[a:b, b:].mT
        if self._fresh and not torch.isfinite(acc).all():
            raise AlgorithmError(
                f"the Hessian of a layer with {d} inputs contains NaN or Inf: its calibration "
                f"activations overflowed (or held NaN); check the data, or accumulate in "
                f"float64 (HessianAccumulator(dtype=torch.float64))")
        self._fresh = False
        return acc

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._acc, self._fresh = value, False

    @property
    def mean_square(self) -> torch.Tensor:
        """Mean ``x_i^2`` per input channel (``diag(H) / 2``): the llama.cpp imatrix."""
        return torch.diagonal(self.H) / 2
