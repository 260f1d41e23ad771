"""HQQ: calibration-free zero-point (and scale) optimisation with a half-quadratic solver.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023
(https://mobiusml.github.io/hqq_blog/). HQQ needs no data: it fits the quantization
parameters to the weight itself under a sparsity-promoting l_p loss (p < 1), which
tolerates the outliers that make min/max (RTN) parameters poor:

    argmin_{z, W_e}  ||W_e||_p^p + beta/2 ||W_e - (W - Q_z^-1(Q_z(W)))||_2^2

(blog eq. 2: ``W_e`` is the error, split off by half-quadratic splitting). Alternating:

- (eq. 4) ``W_e <- shrink_lp(W - W_r, beta)`` with the generalized soft-threshold
  ``shrink_lp(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)``, ``W_r`` the dequantized W;
- (eq. 5) ``z <- < W_q - (W - W_e) / s >``, the group mean, with ``W_q`` the codes
  (lowbit's convention ``w = (q - z) s``, so HQQ's ``1/s`` is our ``scale``);
- ``beta <- kappa beta`` (``kappa = 1.01``), about 20 iterations.

``optimize_scale`` also refits the scale in eq. 5 by least squares of ``W - W_e`` on
``W_q`` per group (``s, z`` jointly); the paper's code fits ``z`` only.

Decisions (lowbit):
- the zero-point stays a *float* tensor (float32, the format's code dtype is not used), as
  in HQQ's own code: rounding it gives back much of the gain. A module that stores an HQQ
  result must keep a float (fp16/fp32) zero-point. ``round_zero=True`` rounds and clamps
  it to the format's integer range instead (for integer-only kernels);
- per group we keep the iterate with the lowest squared weight error, the RTN start
  included (the reference keeps the last iterate and stops once the mean |error| rises),
  so the result is never worse than RTN in weight MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.base import AlgorithmError, QuantResult, check_weight
from lowbit.algorithms.registry import Algorithm, register
from lowbit.formats.scaling import SCALE_DTYPES, QParams, dequantize, quantize, snap_qparams
from lowbit.formats.spec import WeightSpec
from lowbit.formats.superblock import super_scale


@dataclass(frozen=True)
class HQQ:
    """Options of HQQ (defaults of the paper's code)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False
    round_zero: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise AlgorithmError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1 or self.iters < 0:
            raise AlgorithmError("need beta > 0, kappa >= 1 and iters >= 0")

    def quantize(self, W: torch.Tensor, config: WeightSpec) -> QuantResult:
        W = check_weight(W)
        fmt, gran = config.fmt, config.granularity
        if config.symmetric or not fmt.supports_zero_point:
            raise AlgorithmError(
                f"HQQ optimises the zero-point: use an integer format with symmetric=False "
                f"(got format={config.format}, symmetric={config.symmetric})"
            )
        if self.optimize_scale and config.scale_dtype == "e8m0":
            raise AlgorithmError("optimize_scale cannot keep an e8m0 (power-of-two) scale")
        start = config.qparams(W)  # the RTN (min/max) parameters: HQQ's initialisation
        scale = start.scale
        zero = start.zero_point.float()
        mask = gran.rows(torch.ones_like(W))  # 0 marks padding of a partial last group
        count = mask.sum(1)

        def evaluate(scale, zero):  # (on a super-block dtype's grid: ``snap_qparams``)
            qp = snap_qparams(QParams(fmt, gran, scale, zero, config.scale_dtype))
            codes = quantize(W, qp)
            w_r = dequantize(codes, qp)
            err = gran.rows((W - w_r) ** 2).sum(1).reshape(zero.shape)
            return qp, codes, w_r, err

        best_qp, codes, w_r, best_err = evaluate(scale, zero)
        rtn_err = best_err.clone()
        beta = self.beta
        for _ in range(self.iters):
            w_e = _shrink_lp(W - w_r, beta, self.lp_norm)  # eq. 4
            target = gran.rows(W - w_e)
            levels = gran.rows(fmt.decode(codes))
            s_rows = scale.float().reshape(-1, 1)
            if self.optimize_scale:
                scale, zero = _fit_scale_zero(levels, target, mask, count, scale, zero,
                                              config.scale_dtype)
            else:  # eq. 5: z = mean(W_q - (W - W_e) / s) over the group
                zero = ((levels - target / s_rows) * mask).sum(1).div(count).reshape(zero.shape)
            if self.round_zero:
                zero = zero.round().clamp(fmt.min_value, fmt.max_value)
            beta *= self.kappa
            qp, codes, w_r, err = evaluate(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_qp = QParams(
                fmt, gran,
                torch.where(better, qp.scale, best_qp.scale),
                torch.where(better, qp.zero_point, best_qp.zero_point),
                config.scale_dtype,
            )
        zp = best_qp.zero_point
        if self.round_zero:
            zp = zp.to(fmt.code_dtype)
        # groups of one super-block may come from different iterates: snap them together
        best_qp = snap_qparams(QParams(fmt, gran, best_qp.scale, zp, config.scale_dtype))
        info = {
            "algorithm": "hqq",
            "weight_sse": float(best_err.sum()),
            "weight_sse_rtn": float(rtn_err.sum()),
            "groups_improved": int((best_err < rtn_err).sum()),
        }
        return QuantResult(quantize(W, best_qp), best_qp, info=info)


def hqq(W: torch.Tensor, config: WeightSpec, **options) -> QuantResult:
    """HQQ-quantize ``W`` ``[out, in]`` (no calibration data); ``options`` are ``HQQ``'s."""
    return HQQ(**options).quantize(W, config)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal step of the l_p (p <= 1) norm."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def _fit_scale_zero(levels, target, mask, count, scale, zero, scale_dtype):
    """Least squares ``target ~ s (levels - z)`` per group; keeps the old values where the
    fit is degenerate (all codes equal) or gives a non-positive scale."""
    mean_l = (levels * mask).sum(1) / count
    mean_t = (target * mask).sum(1) / count
    dl = (levels - mean_l[:, None]) * mask
    dt = (target - mean_t[:, None]) * mask
    var = (dl * dl).sum(1)
    s = (dl * dt).sum(1) / var.clamp_min(1e-30)
    ok = ((var > 0) & (s > 0)).reshape(zero.shape)
    s = s.reshape(zero.shape)
    z = (mean_l - mean_t / s.reshape(-1).clamp_min(1e-30)).reshape(zero.shape)
    target_dtype = SCALE_DTYPES[scale_dtype]
    tiny = torch.finfo(target_dtype).tiny
    new_scale = torch.where(ok, s, scale.float()).to(target_dtype).clamp_min(tiny)
    return new_scale, torch.where(ok, z, zero)


def _solve(W, scheme, stats, s, options: HQQ):
    """HQQ's zero-point is a float by design (its code keeps fp16): fp16 beside a 16-bit
    scale, float32 beside a float32 one or a super-block dtype's (whose min it encodes)."""
    spec = scheme.weight
    if spec.symmetric:  # no zero-point to fit (e.g. a k-quant recipe's Q5_0 fallback layers)
        from lowbit.algorithms.round_to_nearest import quantize_weight

        codes, qp = quantize_weight(W, spec, scheme.observer)
        return codes, qp, {"algorithm": "rtn", "fallback": "hqq fits a zero-point and this "
                           "grid is symmetric: used RTN"}
    res = options.quantize(W, replace(spec, rotation=None))
    qp = res.qparams
    if qp.zero_point is not None and qp.zero_point.is_floating_point():
        wide = spec.scale_dtype == "fp32" or super_scale(spec.scale_dtype) is not None
        zdtype = torch.float32 if wide else torch.float16
        qp = replace(qp, zero_point=qp.zero_point.to(zdtype))
    return res.codes, qp, dict(res.info)


register(Algorithm("hqq", "half-quadratic zero-point (and scale) fit, no data (Badri & Shaji, "
                   "2023)", _solve, HQQ))
