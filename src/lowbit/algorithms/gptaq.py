"""Asymmetric calibration for GPTQ: match the float model's outputs, not the layer's own.

Li, Yin, Lee, Xiao, Panda, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", ICML 2025 (arXiv:2504.02692): GPTQ quantizes each layer on the inputs
``X~`` that the already quantized layers before it produce, and minimises
``||W X~ - Q X~||^2``; its target is what the float layer would output on those inputs.
GPTAQ targets what the float *model* produced, ``||W X - Q X~||^2`` with ``X`` the float
model's inputs to the same layer, so each layer also absorbs the error that reached it.

lowbit solves this with GPTQ's own machinery. With ``H = 2 X~ X~^T`` and the cross moment
``C = 2 X~ X^T`` (both averaged over the tokens like ``HessianAccumulator``),

    ||W X - Q X~||^2 = tr((Q - W') H (Q - W')^T) + const,   W' H = W C^T,

so GPTQ (and its refinement) run unchanged against ``H`` on the target
``W' = W + W (C^T - H) H^-1``, written as a correction so that ``X~ = X`` gives ``W' = W``
exactly (the paper derives a column-wise update for the same objective instead). The
correction's solve is damped like GPTQ's (``percdamp * mean(diag H)`` on the diagonal).
"""

from __future__ import annotations

import torch

from lowbit.algorithms.base import AlgorithmError


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor,
                      percdamp: float = 0.01) -> torch.Tensor:
    """``W'`` with ``W' (H + lambda I) = W C^T + lambda W`` (module docstring): the weight
    GPTQ should quantize against ``H`` so that ``Q X~`` matches the float ``W X``."""
    if C.shape != H.shape or H.shape != (W.shape[1], W.shape[1]):
        raise AlgorithmError(f"GPTAQ needs H and C of shape [{W.shape[1]}, {W.shape[1]}] for a "
                             f"weight of shape {tuple(W.shape)}, got {tuple(H.shape)} and "
                             f"{tuple(C.shape)}")
    Hd = H.to(torch.float64, copy=True)
    Hd.diagonal().add_(percdamp * float(Hd.diagonal().mean().clamp_min(1e-30)))
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    if int(info) != 0:
        raise AlgorithmError("GPTAQ: the input covariance is not positive definite even "
                             "damped; calibrate on more (and more varied) data")
    D = C.mT.to(torch.float64, copy=True).sub_(H)  # C^T - H
    out = torch.empty_like(W)
    for a in range(0, W.shape[0], ROWS_AT_ONCE):  # row chunks: the float64 buffers stay small
        Wd = W[a:a + ROWS_AT_ONCE].double()
        correction = torch.cholesky_solve((Wd @ D).T, L).T  # rhs (H + lambda I)^-1
        out[a:a + ROWS_AT_ONCE] = Wd + correction
    return out


#: rows of ``W`` corrected at once (float64 buffers of ``ROWS_AT_ONCE x in``; a whole
#: 3072 x 576 gate/up group took 69 MB at once, a 576 x 1536 down_proj 103 MB)
ROWS_AT_ONCE = 256
