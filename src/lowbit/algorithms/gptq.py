"""GPTQ: accurate post-training quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1.

For one linear layer the objective is ``argmin_Q ||W X - Q X||_2^2`` with ``H = 2 X X^T``
(``HessianAccumulator``). Columns are quantized one at a time, left to right; after column
``q`` the error is spread over the columns not yet quantized (eq. 2 / OBQ update):

    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{:,q}

Algorithm 1 makes this fast and stable:
- the inverse Hessians of all the shrinking column sets are the rows of the upper Cholesky
  factor of ``H^-1`` (``Hinv`` below; step "H^-1 <- Cholesky(H^-1)^T");
- "lazy batch" updates: inside a block of ``block_size`` columns the update touches only
  the block; the rest of ``W`` gets one matrix product per block (``E`` is ``Err1``);
- dampening: ``lambda = percdamp * mean(diag H)`` is added to the diagonal. If Cholesky
  still fails we multiply ``percdamp`` by 10 until ``max_percdamp``, then raise.

Extras of the reference code (``gptq.py`` in IST-DASLab/gptq and its descendants):
- dead inputs: ``H_ii = 0`` means the input never fired; set ``H_ii = 1`` and ``W_:,i = 0``;
- ``act_order``: quantize columns in order of decreasing ``H_ii``; codes come back in the
  original order;
- groups: columns are grouped by their *original* index (contiguous groups, the layout
  ``Granularity`` stores). Without ``static_groups`` a group's scale / zero-point are
  computed when the first of its columns is reached, from the current, error-updated
  values of its columns (the pending in-block update is applied exactly); with
  ``static_groups`` all group parameters come up front from the original ``W``;
- ``clip_ratios`` (the reference's ``Quantizer(mse=True)``): each group's min/max range is
  shrunk by the ratio with the least ``sum |w - q(w)|^2.4`` over its elements (a recipe
  asks for it with ``observer: mse``).

``refine_passes`` then lowers the same objective from GPTQ's solution (``refine.py``):
each pass refits every row's group scales (and float zero-points) by least squares under
``H`` with the codes fixed, then runs one sweep of QuantEase coordinate descent over the
codes with the parameters fixed (Behdin et al., 2023, Algorithm 1).

Each column is quantized through ``scaling.quantize`` / ``dequantize`` with that column's
parameters, so any format works: integer, float, lookup (NF4, codebooks); integer formats
take an inlined copy of the same arithmetic (``_IntColumn``, tested bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import (
    AlgorithmError,
    HessianAccumulator,
    QuantResult,
    WeightQuantConfig,
    check_weight,
)
from lowbit.algorithms.refine import refine as refine_solution
from lowbit.formats.granularity import Granularity
from lowbit.formats.integer import IntFormat
from lowbit.formats.scaling import (
    QParams,
    compute_qparams,
    dequantize,
    minmax,
    qparams_from_range,
    quantize,
)
from lowbit.kernels import native_solve


@dataclass(frozen=True)
class GPTQ:
    """Options of GPTQ (defaults of the reference implementation)."""

    percdamp: float = 0.01
    max_percdamp: float = 1.0
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    #: shrink each row's (group's) min/max range by the ratio in ``clip_ratios`` that
    #: minimises ``sum |w - q(w)|^clip_norm`` (the reference's ``Quantizer(mse=True)``:
    #: grid 1.0 ... 0.8, norm 2.4); empty = plain min/max
    clip_ratios: tuple[float, ...] = ()
    clip_norm: float = 2.4
    #: rounds of (least-squares group parameters, coordinate-descent sweep) after GPTQ
    #: (``refine.py``); 0 = plain GPTQ
    refine_passes: int = 0
    #: run the column loops of integer formats in lowbit's C kernel where it is built
    #: (``kernels/native_solve.py``); False = the torch loops here, the reference
    native: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp <= self.max_percdamp:
            raise AlgorithmError(
                f"need 0 <= percdamp <= max_percdamp, got {self.percdamp}, {self.max_percdamp}"
            )
        if self.block_size < 1:
            raise AlgorithmError(f"block_size must be >= 1, got {self.block_size}")
        if self.refine_passes < 0:
            raise AlgorithmError(f"refine_passes must be >= 0, got {self.refine_passes}")

    def quantize(
        self, W: torch.Tensor, H: torch.Tensor | HessianAccumulator, config: WeightQuantConfig
    ) -> QuantResult:
        W = check_weight(W).clone()
        nsamples = H.nsamples if isinstance(H, HessianAccumulator) else None
        H = _check_hessian(H, W)
        rows, cols = W.shape
        gran, fmt = config.gran, config.fmt

        dead = torch.diagonal(H) == 0  # inputs that never fired
        H[dead, dead] = 1
        W[:, dead] = 0

        lazy = gran.kind == "group" and not self.static_groups
        gs = gran.group_size if gran.kind == "group" else cols
        # per-tensor / per-channel / static groups: parameters up front from W
        upfront = None if lazy else _clipped_qparams(W, config, config.gran, self.clip_ratios,
                                                       self.clip_norm)
        groups = _GroupParams(rows, -(-cols // gs), config, self.clip_ratios,
                              self.clip_norm) if lazy else None

        refine = self.refine_passes > 0
        W0 = W.clone() if refine else None  # what the refinement works on (with ``H``)
        perm = torch.arange(cols, device=W.device)
        if self.act_order:  # columns in order of decreasing H_ii
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W = W[:, perm]
        invperm = torch.argsort(perm)
        group_of = (perm // gs).tolist()  # original group of the column at each position

        Hinv, used_damp = _inverse_cholesky(H, perm if self.act_order else None,
                                            self.percdamp, self.max_percdamp, W, nsamples)
        if not refine:
            del H  # (the largest buffers of the solve: at most three ``cols x cols``)

        integer = isinstance(fmt, IntFormat)  # codes kept as float until the end
        codes = torch.empty(rows, cols, dtype=torch.float32 if integer else fmt.code_dtype,
                            device=W.device)
        losses = torch.zeros(rows, cols, device=W.device)
        column = _IntColumn(fmt, rows) if integer else _AnyColumn()
        params_of = groups.column if lazy else lambda g: _column_qparams(upfront, g)
        if self.native and column.native and native_solve.usable(W, Hinv):
            _native_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column,
                           params_of, self.block_size)
        else:
            _reference_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column,
                              params_of, self.block_size)
        codes = codes[:, invperm]
        if integer:
            codes = codes.to(fmt.code_dtype)
        qparams = groups.qparams(gran) if lazy else upfront
        refined = None
        if refine:
            del Hinv, W
            H.diagonal().add_(used_damp * float(torch.diagonal(H).mean()))

            def columns(qp):
                fresh = _IntColumn(fmt, rows) if integer else _AnyColumn()
                return fresh, lambda g: _column_qparams(qp, g)

            codes, qparams, refined = refine_solution(W0, H.to(W0.dtype), codes, qparams,
                                                      self.refine_passes, self.block_size,
                                                      columns, self.native)
        info = {
            "algorithm": "gptq",
            "loss": float(losses.sum()),
            "percdamp": used_damp,
            "dead_inputs": int(dead.sum()),
            "act_order": self.act_order,
        }
        if refined is not None:
            info.update(refined)
        return QuantResult(codes, qparams, info=info)


def _reference_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column,
                      params_of, block_size) -> None:
    """Algorithm 1's loop over lazy-batch blocks, one torch call per column step (any
    format; the reference of ``_native_blocks``). ``groups`` is None unless the group
    parameters start lazily."""
    cols = W.shape[1]
    diag = torch.diagonal(Hinv).tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if groups is not None and not groups.started[g]:
                _start_group(groups, g, W, Err1, Hinv, i1, i, invperm, gs)
            if column.group != g:  # (act_order visits the groups in any order)
                column.use(g, params_of)
            w = W1[:, i]
            c, q = column.quantize(w)
            codes[:, i1 + i] = c
            err1 = (w - q).div_(diag[i1 + i])  # OBQ update of the block's remaining columns
            losses[:, i1 + i] = err1.square() / 2
            W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the rest of W, once per block


def _start_group(groups, g, W, Err1, Hinv, i1, i, invperm, gs) -> None:
    """Fix group ``g``'s parameters from its columns (none quantized yet) with the block's
    pending update (columns ``i1 .. i1 + i`` done) applied."""
    pos = invperm[g * gs : min((g + 1) * gs, W.shape[1])]
    groups.start(g, W[:, pos] - Err1[:, :i] @ Hinv[i1 : i1 + i, pos])


def _native_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column,
                   params_of, block_size) -> None:
    """``_reference_blocks`` for integer formats with each block's columns in one C call
    (``native_solve.gptq_columns``), split only where a lazy group starts."""
    rows, cols = W.shape
    d = torch.diagonal(Hinv).contiguous()
    group_idx = torch.tensor(group_of, dtype=torch.int64)
    table = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        i = 0
        while i < i2 - i1:
            if groups is not None and not groups.started[group_of[i1 + i]]:
                _start_group(groups, group_of[i1 + i], W, Err1, Hinv, i1, i, invperm, gs)
            k = i + 1  # the segment runs until the next group that has not started
            while k < i2 - i1 and (groups is None or groups.started[group_of[i1 + k]]):
                k += 1
            for g in sorted(set(group_of[i1 + i : i1 + k])):
                column.use(g, params_of)
                if table is None:
                    table = native_solve.GroupTable(-(-cols // gs), rows,
                                                    column.zero is not None)
                table.set(g, column.scale, column.zero)
            native_solve.gptq_columns(W1, Err1, i, k, Hinv, i1, d[i1:i2],
                                      group_idx[i1:i2], table, column.lo, column.hi, codes,
                                      losses)
            i = k
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the rest of W, once per block


def gptq(
    W: torch.Tensor,
    H: torch.Tensor | HessianAccumulator,
    config: WeightQuantConfig,
    **options,
) -> QuantResult:
    """GPTQ-quantize ``W`` ``[out, in]`` given ``H`` ``[in, in]``; ``options`` are ``GPTQ``'s."""
    return GPTQ(**options).quantize(W, H, config)


class _GroupParams:
    """Scale / zero-point of contiguous groups, computed when each group starts."""

    def __init__(self, rows: int, n_groups: int, config: WeightQuantConfig,
                 clip_ratios: tuple[float, ...] = (), clip_norm: float = 2.4):
        self.config, self.clip_ratios, self.clip_norm = config, clip_ratios, clip_norm
        self.started = [False] * n_groups
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.shape = (rows, n_groups)

    def start(self, g: int, current: torch.Tensor) -> None:
        qp = _clipped_qparams(current, self.config, Granularity.per_channel(0),
                              self.clip_ratios, self.clip_norm)
        if self.scale is None:
            self.scale = qp.scale.new_ones(self.shape)
            if qp.zero_point is not None:
                self.zero = qp.zero_point.new_zeros(self.shape)
        self.scale[:, g] = qp.scale
        if self.zero is not None:
            self.zero[:, g] = qp.zero_point
        self.started[g] = True

    def column(self, g: int) -> QParams:
        zero = None if self.zero is None else self.zero[:, g]
        return QParams(self.config.fmt, Granularity.per_channel(0), self.scale[:, g], zero,
                       self.config.scale_dtype)

    def qparams(self, gran: Granularity) -> QParams:
        return QParams(self.config.fmt, gran, self.scale, self.zero, self.config.scale_dtype)


class _AnyColumn:
    """One column through ``scaling.quantize`` / ``dequantize``: any format."""

    group = -1
    native = False  # no C loop for it

    def use(self, group: int, params_of) -> None:
        """Quantize with group ``group``'s parameters (``params_of(group)``, final once the
        group has started)."""
        self.group, self.qp = group, params_of(group)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = quantize(w.unsqueeze(1), self.qp)
        return c.squeeze(1), dequantize(c, self.qp).squeeze(1)

    def table(self, n_groups: int, params_of):
        """No C loop for this format (``_IntColumn.table``)."""
        return None


class _IntColumn:
    """The same arithmetic for integer formats, with the column's float32 scale and
    zero-point expanded once per group (``QParams.expand``): ``c = clamp(round(w / s + z))``,
    ``q = (c - z) s``, codes kept as float32 (exact for <= 8 bits) until the end."""

    group = -1
    native = True  # the C loops (``native_solve``) do this arithmetic

    def __init__(self, fmt: IntFormat, rows: int):
        self.lo, self.hi, self.rows = float(fmt.qmin), float(fmt.qmax), rows
        self.cache: dict[int, tuple] = {}

    def use(self, group: int, params_of) -> None:
        if group not in self.cache:
            qp = params_of(group)
            scale, zero = qp.expand((self.rows, 1))
            scale = scale.expand(self.rows, 1).reshape(-1).contiguous()
            zero = None if qp.zero_point is None else \
                zero.expand(self.rows, 1).reshape(-1).contiguous()
            self.cache[group] = (scale, zero)
        self.group = group
        self.scale, self.zero = self.cache[group]

    def table(self, n_groups: int, params_of) -> native_solve.GroupTable:
        """Every group's parameters for the C loops (``native_solve``)."""
        table = None
        for g in range(n_groups):
            self.use(g, params_of)
            if table is None:
                table = native_solve.GroupTable(n_groups, self.rows, self.zero is not None)
            table.set(g, self.scale, self.zero)
        return table

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = w / self.scale
        if self.zero is not None:
            y += self.zero
        c = y.round_().clamp_(self.lo, self.hi)
        q = c - self.zero if self.zero is not None else c.clone()
        return c, q.mul_(self.scale)


def _clipped_qparams(W: torch.Tensor, cfg: WeightQuantConfig, gran: Granularity,
                     ratios: tuple[float, ...], norm: float) -> QParams:
    """Min/max parameters of ``W`` under ``gran``, each parameter's range shrunk by the ratio
    (of ``ratios``) with the least ``sum |W - q(W)|^norm`` over its elements."""
    opts = dict(symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype,
                integer_zero_point=cfg.integer_zero_point)
    if not ratios:
        return compute_qparams(W, cfg.fmt, gran, **opts)
    lo, hi = minmax(W, gran)
    best = best_err = None
    for r in ratios:
        qp = qparams_from_range(lo * r, hi * r, cfg.fmt, gran, **opts)
        err = gran.rows((dequantize(quantize(W, qp), qp) - W).abs_().pow_(norm)).sum(-1)
        err = err.reshape(qp.scale.shape)
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, qp.scale, best.scale)
        if qp.zero_point is not None:
            best.zero_point = torch.where(better, qp.zero_point, best.zero_point)
    return best


def _column_qparams(qp: QParams, group: int) -> QParams:
    """Parameters for one column (as an ``[out, 1]`` tensor) from up-front parameters."""
    kind = qp.granularity.kind
    if kind == "tensor":
        return qp
    if kind == "channel":
        return QParams(qp.format, Granularity.per_channel(0), qp.scale, qp.zero_point,
                       qp.scale_dtype)
    zp = None if qp.zero_point is None else qp.zero_point[:, group]
    return QParams(qp.format, Granularity.per_channel(0), qp.scale[:, group], zp,
                   qp.scale_dtype)


def _check_hessian(H: torch.Tensor | HessianAccumulator, W: torch.Tensor) -> torch.Tensor:
    if isinstance(H, HessianAccumulator):
        if H.nsamples == 0:
            raise AlgorithmError("the Hessian has seen no calibration tokens; call add_batch")
        H = H.H
    cols = W.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (cols, cols):
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise AlgorithmError(f"Hessian must be [{cols}, {cols}] for a weight of shape "
                             f"{tuple(W.shape)}, got {got}")
    if not torch.isfinite(H).all():
        raise AlgorithmError(
            f"Hessian for the layer with weight shape {tuple(W.shape)} contains NaN or Inf: "
            f"the calibration activations overflowed; accumulate in float64 or check the data"
        )
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    return H.detach().to(dtype).clone()


def _inverse_cholesky(
    H: torch.Tensor, perm: torch.Tensor | None, percdamp: float, max_percdamp: float,
    W: torch.Tensor, nsamples
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H_perm + lambda I)^-1`` (``H_perm``: rows and columns in
    the order ``perm``, or as they are), escalating the damping on failure; row-major."""
    mean_diag = float(torch.diagonal(H).mean())
    damp = percdamp
    while True:
        Hd = H.clone() if perm is None else H[perm[:, None], perm]  # (one gather)
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and torch.isfinite(U).all():
                return U.float().contiguous(), damp  # (LAPACK's factor is column-major)
        nxt = damp * 10 if damp > 0 else 0.01
        if nxt > max_percdamp * (1 + 1e-9):
            seen = f" from {nsamples} tokens" if nsamples is not None else ""
            raise AlgorithmError(
                f"GPTQ: the Hessian of the layer with weight shape {tuple(W.shape)}{seen} is "
                f"not positive definite even with percdamp={damp:g}; calibrate on more (and "
                f"more varied) data, or raise max_percdamp / percdamp"
            )
        damp = nxt
