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
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import AlgorithmError
from lowbit.algorithms.registry import Algorithm, register


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


@dataclass(frozen=True)
class SmoothQuant:
    """Options of lowbit's SmoothQuant: the migration strengths tried per group and the
    static-range clip ratios (``group.best_clip``)."""

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    act_clip_ratios: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6)

    def __post_init__(self) -> None:
        if not all(0 <= a <= 1 for a in self.alphas):
            raise AlgorithmError(f"alphas must lie in [0, 1], got {self.alphas}")
        if not self.act_clip_ratios or not all(0 < r <= 1 for r in self.act_clip_ratios):
            raise AlgorithmError(f"act_clip_ratios must lie in (0, 1], got "
                                 f"{self.act_clip_ratios}")


def smooth_search(members, stats, options: SmoothQuant):
    """Eq. 4 with alpha chosen per group by the simulated W8A8 output error
    ``||Q_a(X/s) Q_w(W s)^T - X W^T||^2`` on a token sample; ``s = 1`` competes too."""
    from lowbit.algorithms.group import best_clip, layer_input, rtn_values

    X = stats.sample()
    weights = [m.module.weight.detach().float() for m in members]
    ref = [X @ W.T for W in weights]
    best = (float("inf"), None, None)
    for alpha in (None, *options.alphas):
        s = None if alpha is None else smoothquant_scales(stats.absmax, weights, alpha)
        w_hat = [rtn_values(W if s is None else W * s, m.scheme)
                 for W, m in zip(weights, members, strict=True)]
        Xs, amax = layer_input(members, stats, X, s)
        err, _ = best_clip(members, Xs, amax, w_hat, ref, options.act_clip_ratios)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], {"smooth_alpha": best[2]}


def _solve(W, scheme, stats, s, options):
    """The weights are rounded to nearest once the group's scale is folded in."""
    from lowbit.algorithms.round_to_nearest import quantize_weight

    codes, qparams = quantize_weight(W, scheme.weight, scheme.observer)
    return codes, qparams, {"algorithm": "smoothquant"}


register(Algorithm("smoothquant", "activation outliers migrated into the weights by a "
                   "per-channel scale (Xiao et al., 2023, eq. 4), alpha searched per group",
                   _solve, SmoothQuant, (), frozenset({"absmax", "sample"}), needs_data=True,
                   input_scale="smoothquant", search=smooth_search, rotates=True))
