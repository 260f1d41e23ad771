"""AWQ: activation-aware weight quantization (scale search, then clipping search).

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024 (arXiv:2306.00978), section 3.

Salient weights are the input channels with large activations. Scaling such a channel up
before quantization and the activation down by the same factor keeps ``W x`` unchanged
and shrinks the channel's relative rounding error (eq. 2-3):

    Q(W diag(s)) (diag(s)^-1 X)    with    s = s_X^alpha,
    alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X - W X ||                  (eq. 4-5)

where ``s_X`` is the mean |x| per input channel and alpha is searched on a grid of
``n_grid`` points ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` (alpha = 0 is plain RTN). As in
the reference code (``auto_scale``) ``s`` is normalised by ``sqrt(max(s) min(s))``.

Then (``auto_clip`` in the reference) the clipping range of each group of the scaled weight
is shrunk to ``max|w| (1 - i / clip_grid)``, ``i < max_shrink * clip_grid``, choosing per
output channel and group the ratio that minimises that group's share of the output error
``mean_t (sum_{k in g} x_tk (q_ok - w_ok))^2`` on up to ``n_clip_tokens`` tokens.

The result holds the codes of ``W diag(s)`` and ``input_scale = s``; folding ``1/s`` into
the op that feeds this layer (a norm or a linear) is the model layer's job. Layers that
share an input (q, k, v) must share ``s``: concatenate their weights along ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.base import AlgorithmError, QuantResult, check_inputs, check_weight
from lowbit.algorithms.registry import Algorithm, register
from lowbit.formats.rotation import rotate
from lowbit.formats.scaling import dequantize, minmax, quantize
from lowbit.formats.spec import WeightSpec


@dataclass(frozen=True)
class AWQ:
    """Options of AWQ (defaults of the reference implementation)."""

    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    clip_grid: int = 20
    n_clip_tokens: int = 512
    #: the layer quantizes ``W diag(s) R`` and rotates its input (``formats.rotation``): the
    #: scale search measures that error; the clipping search has no rotated form
    rotation: str | None = None

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1 or self.n_clip_tokens < 1:
            raise AlgorithmError("n_grid, clip_grid and n_clip_tokens must be >= 1")
        if self.rotation is not None and self.clip:
            raise AlgorithmError("AWQ's clipping search runs in the unrotated basis: pass "
                                 "clip=False with a rotation (GPTQ then sets the ranges)")
        if not 0 <= self.max_shrink < 1:
            raise AlgorithmError(f"max_shrink must be in [0, 1), got {self.max_shrink}")

    def quantize(
        self,
        W: torch.Tensor,
        X: torch.Tensor,
        config: WeightSpec,
        act_scale: torch.Tensor | None = None,
    ) -> QuantResult:
        W = check_weight(W)
        X = check_inputs(X, W.shape[1])
        if act_scale is None:
            act_scale = X.abs().mean(0)
        elif act_scale.shape != (W.shape[1],) or not torch.isfinite(act_scale).all():
            raise AlgorithmError(
                f"act_scale must be a finite [{W.shape[1]}] tensor (mean |x| per input "
                f"channel), got shape {tuple(act_scale.shape)}"
            )
        act_scale = act_scale.detach().float().abs()
        Y = X @ W.T

        losses = []
        best = (float("inf"), 0.0, torch.ones(W.shape[1], device=W.device))
        for i in range(self.n_grid):  # eq. 5: grid search over alpha
            alpha = i / self.n_grid
            s = act_scale.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            w_hat = self._rounded(W * s, config) / s
            loss = float((X @ w_hat.T - Y).pow(2).mean())
            losses.append(loss)
            if loss < best[0]:
                best = (loss, alpha, s)
        loss, alpha, s = best

        Ws = W * s
        lo, hi = minmax(Ws, config.granularity)
        info = {"algorithm": "awq", "alpha": alpha, "output_mse": loss,
                "output_mse_rtn": losses[0], "alpha_losses": losses}
        qp = self._qparams(lo, hi, config)
        if self.clip and config.granularity.kind != "tensor":
            c_lo, c_hi, ratio = self._search_clip(Ws, X / s, lo, hi, config)
            clipped = self._qparams(c_lo, c_hi, config)
            # the search is per group on a token sample; keep it only if the layer gains
            clip_loss = float((X @ (_values(Ws, clipped) / s).T - Y).pow(2).mean())
            info["clip_used"] = clip_loss <= loss
            if clip_loss <= loss:
                qp, info["output_mse"] = clipped, clip_loss
                info["clip_ratio_mean"] = float(ratio.mean())
        return QuantResult(quantize(Ws, qp), qp, input_scale=s, info=info)

    def _rounded(self, Ws: torch.Tensor, config: WeightSpec) -> torch.Tensor:
        """RTN of ``Ws`` as the layer applies it: ``Q(Ws R) R^T`` when it rotates its input."""
        if self.rotation is None:
            return _values(Ws, config.qparams(Ws))
        Wr = rotate(Ws.double(), self.rotation).float()
        q = _values(Wr, config.qparams(Wr))
        return rotate(q.double(), self.rotation, inverse=True).float()

    @staticmethod
    def _qparams(lo, hi, config):
        return config.range_qparams(lo, hi)

    def _search_clip(self, Ws, Xs, lo, hi, config):
        """Per (row, group) shrink of the range minimising that group's output error."""
        out, k = Ws.shape
        gs = config.group_size or k
        n_groups = -(-k // gs)
        pad = n_groups * gs - k
        step = max(1, Xs.shape[0] // self.n_clip_tokens)
        Xg = torch.nn.functional.pad(Xs[::step][: self.n_clip_tokens], (0, pad))
        Xg = Xg.reshape(-1, n_groups, gs)
        param_shape = lo.shape
        amax = torch.maximum(lo.abs(), hi.abs())
        best_lo, best_hi = lo.clone(), hi.clone()
        best_err = torch.full(param_shape, float("inf"), device=Ws.device)
        best_ratio = torch.ones(param_shape, device=Ws.device)
        for i in range(max(1, int(self.max_shrink * self.clip_grid))):
            ratio = 1 - i / self.clip_grid
            m = amax * ratio
            c_lo, c_hi = torch.maximum(lo, -m), torch.minimum(hi, m)
            diff = _values(Ws, self._qparams(c_lo, c_hi, config)) - Ws
            diff = torch.nn.functional.pad(diff, (0, pad)).reshape(out, n_groups, gs)
            err = _group_output_error(diff, Xg).reshape(param_shape)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        return best_lo, best_hi, best_ratio


def awq(
    W: torch.Tensor,
    X: torch.Tensor,
    config: WeightSpec,
    *,
    act_scale: torch.Tensor | None = None,
    **options,
) -> QuantResult:
    """AWQ-quantize ``W`` ``[out, in]`` on calibration inputs ``X`` ``[tokens, in]``.

    ``act_scale`` is the mean |x| per input channel (computed from ``X`` when omitted);
    ``options`` are ``AWQ``'s. The result's ``input_scale`` is the chosen ``s``.
    """
    return AWQ(**options).quantize(W, X, config, act_scale)


def _values(W: torch.Tensor, qp) -> torch.Tensor:
    return dequantize(quantize(W, qp), qp)


def _group_output_error(diff: torch.Tensor, Xg: torch.Tensor, budget: int = 1 << 22):
    """``mean_t (sum_k Xg[t,g,k] diff[o,g,k])^2`` as ``[out, groups]``, in row chunks."""
    out, n_groups, _ = diff.shape
    chunk = max(1, budget // max(1, Xg.shape[0] * n_groups))
    parts = []
    for o in range(0, out, chunk):
        partial = torch.einsum("ogk,tgk->otg", diff[o : o + chunk], Xg)
        parts.append(partial.pow(2).mean(1))
    return torch.cat(parts)


def awq_group_scale(members, stats, options):
    """AWQ's scale search for a group (eq. 4 on ``U`` with ``U^T U = H / 2``: AWQ's losses are
    quadratic forms in the inputs, so the Cholesky factor stands in for the tokens, exactly,
    and the cost no longer grows with the calibration set). The members share ``s``; the
    lowest-bit member's spec scores it."""
    from lowbit.algorithms.stats import sqrt_gram

    W = torch.cat([m.module.weight.detach().float() for m in members])
    spec = min((replace(m.scheme.weight, rotation=None) for m in members),
               key=lambda c: c.fmt.bits)
    rotations = {m.scheme.weight.rotation for m in members}
    if len(rotations) > 1:
        raise AlgorithmError(f"{', '.join(m.name for m in members)} share one input, so they "
                             f"share one AWQ scale: rotate all of them or none")
    n_grid = getattr(options, "n_grid", AWQ.n_grid)
    res = awq(W, sqrt_gram(stats.hessian.H), spec, act_scale=stats.abs_mean, clip=False,
              rotation=rotations.pop(), n_grid=n_grid)
    return res.input_scale, {"awq_alpha": res.info["alpha"]}


def _solve(W, scheme, stats, s, options: AWQ):
    """AWQ's clipping search per layer (the group's scale is already in ``W`` and ``s``)."""
    from lowbit.algorithms.stats import sqrt_gram

    U = sqrt_gram(stats.hessian.H)
    res = replace(options, n_grid=1, n_clip_tokens=U.shape[0]).quantize(
        W, U if s is None else U / s, replace(scheme.weight, rotation=None), None)
    return res.codes, res.qparams, dict(res.info)


register(Algorithm("awq", "activation-aware input scales and clipping (Lin et al., 2024)",
                   _solve, AWQ, (), frozenset({"hessian", "absmean"}), needs_data=True,
                   input_scale="awq", search=awq_group_scale))
