"""Running statistics of a group's shared input, as the algorithms read them.

One ``InputStats`` per group of linears that read the same input (q/k/v; gate/up), filled
batch by batch by the block runner: GPTQ's Hessian ``H = 2/n X^T X`` (``HessianAccumulator``),
GPTAQ's cross moment with the float model's inputs, mean ``x^2`` (the imatrix), mean and
max ``|x|`` (AWQ, SmoothQuant) and a token sample for the static-range searches. Only what
``need`` names is accumulated.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.base import AlgorithmError, HessianAccumulator
from lowbit.formats import rotate

#: rows with the largest entries kept in every batch's token sample (``InputStats.add``)
TOP_ROWS = 8


class InputStats:
    """Running statistics of one input (shared by the members of a group)."""

    def __init__(self, width: int, need: set[str], sample_per_batch: int = 0):
        self.width, self.need, self.n = width, need, 0
        self.hessian = HessianAccumulator(width) if "hessian" in need else None
        #: GPTAQ's cross moment ``2/n sum x~ x^T`` with the float model's inputs ``x``
        #: (``algorithms/gptaq.py``), averaged like the Hessian; None until both are seen
        self.cross = None
        self.sq = torch.zeros(width, dtype=torch.float64)
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.absmax = torch.zeros(width)
        self.samples: list[torch.Tensor] = []
        self.sample_per_batch = sample_per_batch
        self._gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Fold in one batch of inputs ``x``; ``x_float``: the float model's inputs to the
        same layer for the same tokens (GPTAQ's cross moment)."""
        x = x.detach().reshape(-1, self.width).float()
        self.n += x.shape[0]
        if self.hessian is not None:
            self.hessian.add_batch(x)
        if "cross" in self.need and x_float is not None:
            xf = x_float.detach().reshape(-1, self.width).float()
            if self.cross is None:
                self.cross = torch.zeros(self.width, self.width)
            n = self.hessian.nsamples  # (the Hessian's running average, same tokens)
            self.cross.addmm_(x.T, xf, beta=(n - x.shape[0]) / n, alpha=2.0 / n)
        if self.hessian is None:  # (with a Hessian, mean x^2 is its diagonal / 2)
            self.sq += x.pow(2).sum(0, dtype=torch.float64)
        if "absmean" in self.need:
            self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if "absmax" in self.need:
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if "sample" in self.need and self.sample_per_batch:
            # random rows (seeded) plus the rows with the largest entries: the rare tokens
            # with massive activations set a static range, so the sample must hold them
            pick = torch.randperm(x.shape[0], generator=self._gen)[: self.sample_per_batch]
            top = x.abs().amax(1).topk(min(x.shape[0], TOP_ROWS)).indices
            self.samples.append(x[torch.cat([pick, top]).unique()].clone())

    @property
    def mean_square(self) -> torch.Tensor:
        if self.hessian is not None:
            return self.hessian.mean_square.float()
        return (self.sq / max(self.n, 1)).float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.width)


def scaled_diag(stats: InputStats, s: torch.Tensor | None) -> torch.Tensor:
    """Mean ``(x / s)^2`` per input channel (the imatrix of the scaled input)."""
    d = stats.mean_square
    return d if s is None else d / s.pow(2)


def sqrt_gram(H: torch.Tensor) -> torch.Tensor:
    """``U`` with ``U^T U = H / 2`` (upper Cholesky factor), jittered when singular."""
    sigma = H.double() / 2
    jitter = 1e-8 * float(sigma.diagonal().mean().clamp_min(1e-30))
    for _ in range(8):
        eye = torch.eye(len(sigma), dtype=sigma.dtype)
        L, info = torch.linalg.cholesky_ex(sigma + jitter * eye)
        if int(info) == 0:
            return L.T.float().contiguous()
        jitter *= 100
    raise AlgorithmError("the input covariance is not positive semi-definite (NaN in data?)")


def rotate_weight_and_hessian(W: torch.Tensor, H: torch.Tensor, rotation: str):
    """``(W R, R^T H R)``: the weight and input Hessian seen by a layer that rotates its input
    ``x -> x R`` (``formats.rotation``), since ``x W^T = (x R)(W R)^T``. GPTQ on them is
    "GPTQ on the rotated model" (QuaRot, Ashkboos et al., 2024, sec. 4; QuIP's incoherence
    processing, Chee et al., 2023, sec. 3): the rotation spreads outlier input channels, so
    every group holds weights of similar size. Computed in float64."""
    Wr = rotate(W.double(), rotation).float()
    Hr = rotate(rotate(H.double(), rotation).T.contiguous(), rotation)
    return Wr, ((Hr + Hr.T) / 2).float()
