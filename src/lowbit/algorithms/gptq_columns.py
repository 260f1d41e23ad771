"""GPTQ's column loop and its per-column quantizers (Frantar et al., 2022, Algorithm 1).

``solve_blocks`` is Algorithm 1's loop over lazy-batch blocks: in torch, one call per column
step, for any format (``AnyColumn``: ``scaling.quantize`` / ``dequantize``; ``IntColumn``:
the same arithmetic inlined for integer formats), or for integer formats each block's
columns in one C call (``kernels/native_solve.py``), split only where a lazy group starts.
``GroupParams`` holds the group scales fixed as groups start; ``clipped_qparams`` is the
reference's ``Quantizer(mse=True)`` range search.
"""

from __future__ import annotations

import torch

from lowbit.formats.granularity import Granularity
from lowbit.formats.integer import IntFormat
from lowbit.formats.scaling import (
    QParams,
    compute_qparams,
    dequantize,
    quantize,
)
from lowbit.formats.spec import WeightSpec
from lowbit.kernels import native_solve
from lowbit.observers.weight_clip import best_clip_range


def solve_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column, params_of,
                 block_size, native: bool) -> None:
    """Algorithm 1's loop over lazy-batch blocks, in place. Each block's columns run in
    segments that end where a lazy group starts (``groups`` is None unless the group
    parameters start lazily): one C call per segment for integer formats (``native``,
    ``native_solve.gptq_columns``), else one torch call per column step (any format; the
    reference)."""
    rows, cols = W.shape
    if native:
        d = torch.diagonal(Hinv).contiguous()
        group_idx = torch.tensor(group_of, dtype=torch.int64)
        table = None
    else:
        diag = torch.diagonal(Hinv).tolist()
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
            if not native:
                _reference_columns(W1, Err1, Hinv[i1:i2, i1:i2], i, k, i1, group_of, diag,
                                   column, params_of, codes, losses)
                i = k
                continue
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


def _reference_columns(W1, Err1, Hinv1, c0, c1, i1, group_of, diag, column, params_of,
                       codes, losses) -> None:
    """Columns ``c0 .. c1`` of the block at ``i1``, one torch call per step."""
    for i in range(c0, c1):
        g = group_of[i1 + i]
        if column.group != g:  # (act_order visits the groups in any order)
            column.use(g, params_of)
        w = W1[:, i]
        c, q = column.quantize(w)
        codes[:, i1 + i] = c
        err1 = (w - q).div_(diag[i1 + i])  # OBQ update of the block's remaining columns
        losses[:, i1 + i] = err1.square() / 2
        W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err1


def _start_group(groups, g, W, Err1, Hinv, i1, i, invperm, gs) -> None:
    """Fix group ``g``'s parameters from its columns (none quantized yet) with the block's
    pending update (columns ``i1 .. i1 + i`` done) applied."""
    pos = invperm[g * gs : min((g + 1) * gs, W.shape[1])]
    groups.start(g, W[:, pos] - Err1[:, :i] @ Hinv[i1 : i1 + i, pos])


class GroupParams:
    """Scale / zero-point of contiguous groups, computed when each group starts."""

    def __init__(self, rows: int, n_groups: int, config: WeightSpec,
                 clip_ratios: tuple[float, ...] = (), clip_norm: float = 2.4):
        self.config, self.clip_ratios, self.clip_norm = config, clip_ratios, clip_norm
        self.started = [False] * n_groups
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.shape = (rows, n_groups)

    def start(self, g: int, current: torch.Tensor) -> None:
        qp = clipped_qparams(current, self.config, Granularity.per_channel(0),
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


class AnyColumn:
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
        """No C loop for this format (``IntColumn.table``)."""
        return None


class IntColumn:
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


def clipped_qparams(W: torch.Tensor, cfg: WeightSpec, gran: Granularity,
                     ratios: tuple[float, ...], norm: float) -> QParams:
    """Min/max parameters of ``W`` under ``gran``, each parameter's range shrunk by the ratio
    (of ``ratios``) with the least ``sum |W - q(W)|^norm`` over its elements."""
    if not ratios:
        return compute_qparams(W, cfg.fmt, gran, **cfg.range_options())
    best_lo, best_hi = best_clip_range(
        W, gran, lambda lo, hi: cfg.range_qparams(lo, hi, gran), ratios, norm)
    # one call on the chosen ranges: a super-block dtype's groups are snapped together
    return cfg.range_qparams(best_lo, best_hi, gran)


def column_qparams(qp: QParams, group: int) -> QParams:
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
