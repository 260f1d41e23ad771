"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438), section 4.

``Y = X W^T = (X diag(s)^-1) (diag(s) W^T)``: dividing input channel ``j`` of the
activations by ``s_j`` and multiplying column ``j`` of ``W`` by ``s_j`` leaves the output
unchanged. Eq. 4 chooses

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``alpha`` the migration strength (0.5 balances: both factors then have the same
maximum per channel, ``sqrt(max|X_j| max|W_j|)``). Pure function of statistics; folding
``1/s`` into the preceding norm / linear and ``s`` into ``W`` is the model layer's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.algorithms.base import AlgorithmError


def smoothquant_scales(
    act_absmax: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    alpha: float = 0.5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s`` (eq. 4), float32 of shape ``[in]``.

    ``act_absmax``: max |x_j| per input channel from calibration. ``weight``: the
    ``[out, in]`` weight, or a list of weights that read the same input (q, k, v), which
    then share one ``s``. Apply as ``x / s`` and ``W * s`` (``W`` scaled column-wise).
    Both maxima are clamped to at least ``eps`` (as the reference code does) so dead
    channels give finite factors.
    """
    if not 0 <= alpha <= 1:
        raise AlgorithmError(f"alpha must be in [0, 1], got {alpha}")
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights:
        raise AlgorithmError("smoothquant_scales needs at least one weight")
    act_absmax = act_absmax.detach().float().abs()
    k = act_absmax.shape[-1] if act_absmax.dim() == 1 else -1
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise AlgorithmError(
                f"each weight must be [out, {k}] to match act_absmax of shape "
                f"{tuple(act_absmax.shape)}; got {tuple(w.shape)}"
            )
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    if not (torch.isfinite(act_absmax).all() and torch.isfinite(w_absmax).all()):
        raise AlgorithmError("activation or weight statistics contain NaN or Inf")
    s = act_absmax.clamp_min(eps).pow(alpha) / w_absmax.clamp_min(eps).pow(1 - alpha)
    return s.clamp_min(eps)
