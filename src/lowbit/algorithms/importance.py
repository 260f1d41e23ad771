"""Importance-weighted rounding: per-group range search under an activation-weighted error.

After llama.cpp's importance matrix ("imatrix", Gerganov et al., llama.cpp PR #4861, 2024;
``make_qx_quants`` / ``make_qkx3_quants`` in ``ggml-quants.c``). For one group the loss
is the output error proxy

    L(s, m) = sum_i imp_i (w_i - w_hat_i(s, m))^2,      imp_i = mean_t x_ti^2,

i.e. the diagonal of the layer Hessian ``X X^T / n`` (``HessianAccumulator.mean_square``):
errors on inputs that carry large activations cost more. The search, per group:

1. candidate ranges ``[r lo, r hi]`` for clip ratios ``r`` from 1 down to ``min_ratio``
   (``n_grid`` points); asymmetric formats then search the low end with the high end
   fixed and the high end with the low end fixed (scale and min);
2. for each candidate's codes ``v``, the weighted least-squares refit of the affine map
   (llama.cpp's ``scale = sum imp x v / sum imp v^2``; asymmetric: slope and offset) is
   tried too;
3. per group, the candidate with the lowest ``L`` wins. ``r = 1`` is plain RTN, so the
   weighted error is never worse than RTN's.

Ranges become parameters through ``scaling.qparams_from_range``, so any integer format
(signed, unsigned, symmetric or with a zero-point) works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.base import AlgorithmError, QuantResult, check_weight
from lowbit.algorithms.registry import Algorithm, register
from lowbit.formats.scaling import dequantize, minmax, quantize
from lowbit.formats.spec import WeightSpec


@dataclass(frozen=True)
class ImportanceRTN:
    """Options of the importance-weighted range search."""

    n_grid: int = 20
    min_ratio: float = 0.5
    refit: bool = True

    def __post_init__(self) -> None:
        if self.n_grid < 1 or not 0 < self.min_ratio <= 1:
            raise AlgorithmError("need n_grid >= 1 and 0 < min_ratio <= 1")

    def quantize(
        self, W: torch.Tensor, importance: torch.Tensor, config: WeightSpec
    ) -> QuantResult:
        W = check_weight(W)
        imp = _check_importance(importance, W)
        fmt, gran = config.fmt, config.granularity
        if fmt.kind != "int":
            raise AlgorithmError(f"importance-weighted rounding needs an integer format, "
                                 f"got {fmt.name} ({fmt.kind})")
        lo, hi = minmax(W, gran)
        shape = lo.shape

        def qparams(c_lo, c_hi):
            return config.range_qparams(c_lo, c_hi, gran)

        def loss(qp):
            codes = quantize(W, qp)
            err = gran.rows(imp * (W - dequantize(codes, qp)) ** 2).sum(1).reshape(shape)
            return err, codes

        best_lo, best_hi = lo.clone(), hi.clone()
        best_err, _ = loss(qparams(lo, hi))
        rtn_err = best_err.clone()

        def consider(c_lo, c_hi):
            nonlocal best_lo, best_hi, best_err
            qp = qparams(c_lo, c_hi)
            err, codes = loss(qp)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
            if self.refit:
                f_lo, f_hi, ok = _refit(W, fmt.decode(codes), imp, config)
                err, _ = loss(qparams(torch.where(ok, f_lo, c_lo), torch.where(ok, f_hi, c_hi)))
                better = ok & (err < best_err)
                best_err = torch.where(better, err, best_err)
                best_lo = torch.where(better, f_lo, best_lo)
                best_hi = torch.where(better, f_hi, best_hi)

        ratios = torch.linspace(1.0, self.min_ratio, self.n_grid).tolist()
        for r in ratios:
            consider(lo * r, hi * r)
        if not config.symmetric:  # then the min with the max fixed, and the other way
            for r in ratios:
                consider(lo * r, best_hi)
            for r in ratios:
                consider(best_lo, hi * r)
        qp = qparams(best_lo, best_hi)
        info = {"algorithm": "importance", "weighted_sse": float(best_err.sum()),
                "weighted_sse_rtn": float(rtn_err.sum())}
        return QuantResult(quantize(W, qp), qp, info=info)


def importance_rtn(
    W: torch.Tensor, importance: torch.Tensor, config: WeightSpec, **options
) -> QuantResult:
    """Quantize ``W`` ``[out, in]`` minimising ``sum imp (w - w_hat)^2`` per group.

    ``importance``: mean x^2 per input channel ``[in]`` (``HessianAccumulator.mean_square``)
    or per weight ``[out, in]``. ``options`` are ``ImportanceRTN``'s.
    """
    return ImportanceRTN(**options).quantize(W, importance, config)


def _check_importance(importance: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    if not isinstance(importance, torch.Tensor) or importance.shape not in (W.shape,
                                                                          W.shape[1:]):
        got = tuple(importance.shape) if isinstance(importance, torch.Tensor) else importance
        raise AlgorithmError(f"importance must be [in] ({W.shape[1]},) or [out, in] "
                             f"{tuple(W.shape)}, got {got}")
    imp = importance.detach().float()
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise AlgorithmError("importance must be finite and non-negative (mean x^2)")
    return imp.expand_as(W)


def _refit(W, levels, imp, config):
    """Weighted least squares of ``w ~ a v + b`` per group (``b = 0`` when symmetric),
    returned as the range that gives that affine map: ``[a qmin + b, a qmax + b]``
    (symmetric: ``[-a qmax, a qmax]``, whose absmax scale is ``a``)."""
    gran, fmt = config.granularity, config.fmt
    x, v, w = gran.rows(W), gran.rows(levels), gran.rows(imp)  # padding has w = 0
    if config.symmetric:
        a = (w * x * v).sum(1) / (w * v * v).sum(1).clamp_min(1e-30)
        b = torch.zeros_like(a)
        ok = (w * v * v).sum(1) > 0
    else:
        sw = w.sum(1).clamp_min(1e-30)
        mv, mx = (w * v).sum(1) / sw, (w * x).sum(1) / sw
        dv = v - mv[:, None]
        var = (w * dv * dv).sum(1)
        a = (w * dv * (x - mx[:, None])).sum(1) / var.clamp_min(1e-30)
        b = mx - a * mv
        ok = var > 0
    ok = ok & (a > 0)
    shape = gran.param_shape(W.shape)
    f_lo = (-a * fmt.max_value if config.symmetric else a * fmt.min_value + b).reshape(shape)
    f_hi = (a * fmt.max_value + b).reshape(shape)
    return f_lo, f_hi, ok.reshape(shape)


def _solve(W, scheme, stats, s, options: ImportanceRTN):
    from lowbit.algorithms.stats import scaled_diag

    res = options.quantize(W, scaled_diag(stats, s), replace(scheme.weight, rotation=None))
    return res.codes, res.qparams, dict(res.info)


register(Algorithm("imatrix", "ranges weighted by mean x^2 per input (llama.cpp's importance "
                   "matrix)", _solve, ImportanceRTN, (), frozenset({"diag"}), needs_data=True))
