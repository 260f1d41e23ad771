"""Refining a GPTQ solution on its own objective ``f = tr((W - Q) H (W - Q)^T)``.

GPTQ (``gptq.py``) visits each column once and fixes each group's parameters when the group
starts. Two steps, alternated, then lower ``f`` further; each can only lower it:

1. Group parameters, codes fixed (``refit_group_params``). Row ``r``'s values are linear in
   its groups' parameters: ``q_rj = s_rg a_rj + m_rg`` for ``j`` in group ``g``, with
   ``a = decode(c) - z`` and ``m = 0`` where the zero-point is an integer (or absent), and
   ``a = decode(c)``, ``m = -s z`` where it is a float. So ``f`` restricted to one row is a
   least-squares problem in its ``G`` (or ``2G``) parameters, solved exactly from the normal
   equations ``(A_r^T H A_r) theta_r = A_r^T H w_r``. This is the weighted least-squares
   refit of llama.cpp's ``make_qx_quants`` (also ``importance.py``) with the full Hessian
   instead of its diagonal, so the groups of a row are fitted jointly. The new parameters
   are rounded to their storage dtypes (a super-block dtype's grid: ``scaling.snap_qparams``);
   a row keeps its old ones unless ``f`` drops.
2. Codes, parameters fixed (``coordinate_descent``): cyclic coordinate descent over the
   columns (QuantEase, Behdin et al., 2023, arXiv:2309.01885, Algorithm 1). With
   ``E = W - Q`` and ``G = E H``, ``f`` as a function of column ``j`` alone is
   ``H_jj ||e_j - (e_j - G_j / H_jj)||^2`` + const, separable per row, so its exact
   minimiser over the grid is the level nearest to ``q_j + G_j / H_jj``. ``G`` is kept
   current with GPTQ's lazy-batch trick: within a block of columns by rank-1 updates, the
   rest of ``G`` by one product per block.

``H`` is the damped Hessian GPTQ solved against; ``f / 2`` is in the units of GPTQ's
``loss``. Tensor-wide parameters and groups that do not divide the row are not refitted
(the coordinate descent still runs).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowbit.formats.scaling import QParams, dequantize, snap_qparams
from lowbit.formats.superblock import super_scale
from lowbit.kernels import native_solve

#: rows per chunk of the refit (its largest buffer is ``chunk x cols x groups`` floats)
REFIT_ROWS = 64


def objective_rows(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``diag((W - Q) H (W - Q)^T)``: each row's share of ``f``."""
    E = W - Q
    return (E * (E @ H)).sum(1)


def refine(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, qparams: QParams,
           passes: int, block: int, columns, native: bool = False,
           ) -> tuple[torch.Tensor, QParams, dict]:
    """``passes`` rounds of (refit the group parameters, one coordinate-descent sweep),
    stopping early once a sweep changes no code. ``columns(qparams)`` gives the per-column
    quantizer and its ``params_of`` (as GPTQ's loop uses them); ``native`` runs the sweeps
    in C where the quantizer allows (``native_solve.cd_columns``). Returns the codes, the
    parameters and what happened (``refined_loss`` = ``f / 2`` at the end)."""
    cols = W.shape[1]
    gran = qparams.granularity
    gs = gran.group_size if gran.kind == "group" else cols  # columns per parameter
    fits = gran.kind in ("channel", "group") and cols % gs == 0
    rounds = refitted = 0
    for _ in range(passes):
        rounds += 1
        if fits:
            qparams, rows = refit_group_params(W, H, codes, qparams, gs)
            refitted += rows
        column, params_of = columns(qparams)
        fast = native and native_solve.usable(W, H)
        table = column.table(-(-cols // gs), params_of) if fast else None
        if not coordinate_descent(W, H, codes, qparams, column, params_of, gs, block, table):
            break
    loss = float(objective_rows(W, dequantize(codes, qparams), H).sum()) / 2
    return codes, qparams, {"refined_loss": loss, "refine_rounds": rounds,
                            "refitted_rows": refitted}


def coordinate_descent(W, H, codes, qparams, column, params_of, gs: int, block: int,
                       table=None) -> int:
    """One QuantEase sweep over the columns, updating ``codes`` in place; returns how many
    codes changed. With ``table`` (every group's parameters, ``native_solve.GroupTable``)
    each block's columns run in one C call (``native_solve.cd_columns``), else one torch
    call per column step (the reference)."""
    rows, cols = W.shape
    values = dequantize(codes, qparams)
    G = (W - values) @ H
    if table is not None:  # the C loop: contiguous float32 in, float codes out
        values, H, work = values.float().contiguous(), H.contiguous(), codes.float()
        d, group_idx = torch.diagonal(H).contiguous(), torch.arange(cols) // gs
    else:
        d = torch.diagonal(H).tolist()
    changed = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Gb = G[:, i1:i2].clone()
        dE = torch.zeros(rows, i2 - i1, dtype=W.dtype, device=W.device)
        if table is not None:
            changed += native_solve.cd_columns(Gb, dE, H, i1, d[i1:i2], group_idx[i1:i2],
                                               table, column.lo, column.hi, work, values)
        else:
            for i in range(i2 - i1):
                j = i1 + i
                if column.group != j // gs:
                    column.use(j // gs, params_of)
                c, q = column.quantize(values[:, j] + Gb[:, i] / d[j])
                delta = values[:, j] - q  # the change of e_j = w_j - q_j
                changed += int(torch.count_nonzero(delta))
                codes[:, j], values[:, j], dE[:, i] = c, q, delta
                Gb.addr_(delta, H[j, i1:i2])
        G[:, :i1].addmm_(dE, H[i1:i2, :i1])
        G[:, i2:].addmm_(dE, H[i1:i2, i2:])
        G[:, i1:i2] = Gb
    if table is not None:
        codes.copy_(work)
    return changed


def refit_group_params(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor,
                       qparams: QParams, gs: int) -> tuple[QParams, int]:
    """Least-squares scales (and float offsets) per row under ``H`` with the codes fixed
    (module docstring, step 1); returns the parameters and how many rows took new ones."""
    rows, cols = W.shape
    n_groups = cols // gs
    zero = qparams.zero_point
    offsets = zero is not None and zero.is_floating_point()
    levels = qparams.format.decode(codes).float().reshape(rows, n_groups, gs)
    if zero is not None and not offsets:
        levels = levels - zero.float().reshape(rows, n_groups, 1)
    Hf = H.float()  # the products in float32, the small systems in float64
    H3 = Hf.reshape(cols, n_groups, gs)
    HW = W.float() @ Hf
    scale = torch.empty(rows, n_groups, dtype=torch.float64)
    shift = torch.zeros(rows, n_groups, dtype=torch.float64)
    ones_gram = H.double().reshape(n_groups, gs, n_groups, gs).sum((1, 3))
    for r0 in range(0, rows, REFIT_ROWS):
        r1 = min(r0 + REFIT_ROWS, rows)
        A = levels[r0:r1]
        # T[r, j, h] = sum_{k in group h} H_jk a_rk
        T = torch.einsum("jhk,rhk->rjh", H3, A).reshape(r1 - r0, n_groups, gs, n_groups)
        aa = torch.einsum("rgj,rgjh->rgh", A, T).double()
        hw = HW[r0:r1].reshape(r1 - r0, n_groups, gs)
        rhs = (A * hw).sum(2).double()
        if offsets:
            one_a = T.sum(2).double()  # [r, g, h] = sum_{j in g, k in h} H_jk a_rk
            top = torch.cat([aa, one_a.transpose(1, 2)], 2)
            bottom = torch.cat([one_a, ones_gram.expand(r1 - r0, -1, -1)], 2)
            gram = torch.cat([top, bottom], 1)
            rhs = torch.cat([rhs, hw.sum(2).double()], 1)
        else:
            gram = aa
        ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        gram = gram + ridge[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype)
        theta = torch.linalg.solve(gram, rhs)
        scale[r0:r1] = theta[:, :n_groups]
        if offsets:
            shift[r0:r1] = theta[:, n_groups:]
    old_scale = qparams.scale.reshape(rows, n_groups)
    # a refit keeps each scale's sign (negative only for ``signed_scale`` specs)
    ok = torch.isfinite(scale) & (scale * old_scale.double() > 0)
    new_scale = torch.where(ok, scale, old_scale.double()).to(old_scale.dtype)
    old_zero = new_zero = None if zero is None else zero.reshape(rows, n_groups)
    if offsets:
        new_zero = torch.where(ok, -shift / scale, old_zero.double()).to(zero.dtype)
    if super_scale(qparams.scale_dtype) is not None:  # back on the k-quant grid
        snapped = snap_qparams(replace(qparams, scale=new_scale, zero_point=new_zero))
        new_scale, new_zero = snapped.scale, snapped.zero_point

    def with_params(s2, z2):  # (the parameters in the layout ``qparams`` holds them)
        z2 = None if z2 is None else z2.reshape(zero.shape)
        return replace(qparams, scale=s2.reshape(qparams.scale.shape), zero_point=z2)

    before = objective_rows(W, dequantize(codes, qparams), H)
    after = objective_rows(W, dequantize(codes, with_params(new_scale, new_zero)), H)
    better = (after < before)[:, None]  # the other rows keep their parameters
    new = with_params(torch.where(better, new_scale, old_scale),
                      None if zero is None else torch.where(better, new_zero, old_zero))
    return new, int(better.sum())
