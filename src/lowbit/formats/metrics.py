"""Error metrics shared by every layer: MSE, SQNR, max absolute error, cosine similarity."""

from __future__ import annotations

import math

import torch


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error."""
    return float((reference.double() - approx.double()).pow(2).mean())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_hat)^2), in dB.

    Infinite when ``approx`` equals ``reference``."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def max_abs_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    return float((reference.double() - approx.double()).abs().max())


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine of the angle between the two tensors, flattened."""
    a, b = reference.double().flatten(), approx.double().flatten()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b / denom)


def error_report(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """All metrics at once (for reports and ``lowbit explain``)."""
    return {
        "mse": mse(reference, approx),
        "sqnr_db": sqnr_db(reference, approx),
        "max_abs_error": max_abs_error(reference, approx),
        "cosine": cosine_similarity(reference, approx),
    }
