"""One group of linears that share an input: statistics in, codes and parameters out.

The block runner (``model/runner.py``) collects ``InputStats`` for each group and calls, in
order: ``group_scale`` (AWQ / SmoothQuant choose ``s`` for the whole group, searched by the
algorithm's registered ``search``), ``solve_group`` (each member's ``W diag(s)`` solved by
its algorithm, ``registry.get_algorithm(name).solve``), then ``static_input`` (a calibrated
int8 range for static-activation members). Members are duck-typed: ``name``, ``module``
(the float ``nn.Linear``) and ``scheme`` (``weight``: a ``WeightSpec``, ``activation``,
``algorithm``, ``observer``, ``options``).

Input scaling. AWQ and SmoothQuant pick a factor ``s`` per input channel for the whole group
and every member then quantizes ``W diag(s)`` while its input becomes ``x / s``; the group's
feeder absorbs ``1/s``. Statistics of ``x`` map exactly: ``H_s = diag(s)^-1 H diag(s)^-1``,
``mean (x/s)^2 = mean x^2 / s^2``. So AWQ scales combine with GPTQ or imatrix members.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.algorithms.base import AlgorithmError
from lowbit.algorithms.registry import Algorithm, get_algorithm
from lowbit.algorithms.round_to_nearest import quantize_weight
from lowbit.algorithms.stats import InputStats
from lowbit.formats import (
    WeightSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    get_format,
    qparams_from_range,
    rotate,
)
from lowbit.formats.lookup import is_row_codebook
from lowbit.formats.scaling import snap_qparams

#: static per-tensor activation ranges: the clip ratios tried (``best_clip``)
ACT_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass
class Member:
    name: str
    module: nn.Module  # the float nn.Linear
    scheme: object  # model.recipe.Scheme


@dataclass
class Solution:
    """What one linear becomes: codes + parameters (or a codebook), ready to pack."""

    spec: WeightSpec
    scheme: object
    bias: torch.Tensor | None
    codes: torch.Tensor
    qparams: object = None  # QParams, or the centroids tensor for codebooks
    input_qparams: object = None
    info: dict = field(default_factory=dict)

    @property
    def is_codebook(self) -> bool:
        return is_row_codebook(get_format(self.spec.format))

    def can_scale_rows(self) -> bool:
        return self.spec.granularity.kind in ("channel", "group") and \
            self.spec.scale_dtype != "e8m0"

    def scale_rows(self, r: torch.Tensor) -> None:
        """Multiply every output row by ``r`` (a feeder absorbing ``1/s``): scales, tables, bias."""
        if self.is_codebook:
            shape = (-1,) + (1,) * (self.qparams.dim() - 1)
            self.qparams = self.qparams * r.reshape(shape)
        else:
            scale = self.qparams.scale
            new = (scale.float() * r.reshape((-1,) + (1,) * (scale.dim() - 1))).to(scale.dtype)
            # (a super-block dtype: d and dmin take the factor, rounded to float16 again)
            self.qparams = snap_qparams(replace(self.qparams, scale=new))
        if self.bias is not None:
            self.bias = self.bias * r


def algorithm_of(scheme) -> Algorithm:
    """The registry entry that solves ``scheme`` (a codebook format is always k-means: a
    ``Scheme`` allows only kmeans or rtn on one)."""
    if is_row_codebook(get_format(scheme.weight.format)):
        return get_algorithm("kmeans")
    return get_algorithm(scheme.algorithm)


def options_of(scheme):
    """The resolved options instance of ``scheme``'s algorithm."""
    return algorithm_of(scheme).resolve(getattr(scheme, "options", ()))


def stats_needed(scheme) -> set[str]:
    need = set(get_algorithm(scheme.algorithm).needs)
    if scheme.activation is not None and scheme.activation.mode == "static":
        need |= {"absmax", "sample"}
    return need


def group_scale(members: list[Member], stats: InputStats | None, foldable: bool):
    """``s`` for the group (None = no scaling) and what the search found."""
    kinds = {get_algorithm(m.scheme.algorithm).input_scale for m in members} - {None}
    if len(kinds) > 1:
        raise AlgorithmError(f"{', '.join(m.name for m in members)} share one input, so they "
                             f"cannot mix AWQ and SmoothQuant scales: pick one")
    if not foldable or stats is None or not kinds:
        return None, {}
    kind = kinds.pop()
    scaled = [m for m in members if get_algorithm(m.scheme.algorithm).input_scale == kind]
    search = get_algorithm(kind).search
    return search(scaled if kind == "awq" else members, stats, options_of(scaled[0].scheme))


def solve_group(members: list[Member], stats: InputStats | None,
                s: torch.Tensor | None) -> list[Solution]:
    """Quantize each member's ``W diag(s)`` with its algorithm. Members with the same scheme
    and per-row parameters are solved as one stacked weight: GPTQ, AWQ clipping, imatrix,
    HQQ and k-means treat rows independently given the shared input, so the result is the
    same and the per-column work and ``H^-1`` are paid once."""
    batches: dict = {}
    for m in members:
        per_row = m.scheme.weight.granularity.kind != "tensor"
        key = (m.scheme, m.module.in_features) if per_row else (m.name,)
        batches.setdefault(key, []).append(m)
    out = {}
    for batch in batches.values():
        W = torch.cat([m.module.weight.detach().float() for m in batch])
        name = ", ".join(m.name for m in batch)
        codes, params, info = solve_weight(W, batch[0].scheme, stats, s, name)
        row = 0
        for m in batch:
            rows = slice(row, row + m.module.out_features)
            row = rows.stop
            bias = None if m.module.bias is None else m.module.bias.detach().float().clone()
            if isinstance(params, torch.Tensor):  # codebook centroids
                part = params[rows]
            else:
                zp = None if params.zero_point is None else params.zero_point[rows]
                part = replace(params, scale=params.scale[rows], zero_point=zp)
            sol = Solution(m.scheme.weight, m.scheme, bias, codes[rows], part, info=dict(info))
            if len(batch) > 1:
                sol.info["solved_with"] = name
            if s is not None:
                sol.info["input_scale_max"] = float(s.max())
            out[m.name] = sol
    return [out[m.name] for m in members]


def solve_weight(W, scheme, stats, s, name: str):
    """(codes, QParams or centroids, info) for ``W diag(s)`` under ``scheme``; an algorithm
    that needs data falls back to round to nearest without it (and says so)."""
    algorithm = algorithm_of(scheme)
    Ws = W if s is None else W * s
    try:
        if stats is None and algorithm.needs_data:
            codes, qp = quantize_weight(Ws, scheme.weight, scheme.observer)
            info = {"algorithm": "rtn"}
            if algorithm.input_scale != "smoothquant":
                info["fallback"] = f"{scheme.algorithm} needs calibration statistics: used RTN"
            else:
                info["algorithm"] = "smoothquant"
            return codes, qp, info
        return algorithm.solve(Ws, scheme, stats, s, options_of(scheme))
    except AlgorithmError as exc:
        raise AlgorithmError(f"{name}: {exc}") from exc


def static_input(members, sols, stats, s) -> None:
    """Calibrated per-tensor int8 input scale for static-activation members."""
    static = [(m, sol) for m, sol in zip(members, sols, strict=True)
              if m.scheme.activation is not None and m.scheme.activation.mode == "static"]
    if not static:
        return
    X = stats.sample()
    Xs, amax = layer_input([m for m, _ in static], stats, X, s)
    w_hat = [dequantize(sol.codes, sol.qparams) for _, sol in static]
    ref = [X @ m.module.weight.detach().float().T for m, _ in static]
    ratios = getattr(options_of(static[0][0].scheme), "act_clip_ratios", ACT_CLIP_RATIOS)
    _, amax = best_clip([m for m, _ in static], Xs, amax, w_hat, ref, ratios)
    amax_t = torch.tensor(max(amax, 1e-8))
    for _, sol in static:
        sol.input_qparams = qparams_from_range(-amax_t, amax_t, get_format("int8"),
                                               symmetric=True)
        sol.info["act_amax"] = amax


def best_clip(members, Xs, amax, w_hat, ref, ratios=ACT_CLIP_RATIOS):
    """Static per-tensor activation range: the clip ratio with the least output error."""
    act = members[0].scheme.activation
    ratios = ratios if act is not None and act.mode == "static" else (1.0,)
    best = (float("inf"), amax)
    for r in ratios:
        xq = fake_activation(Xs, amax * r, members[0].scheme)
        err = sum(float((xq @ w.T - y).pow(2).sum()) for w, y in zip(w_hat, ref, strict=True))
        if err < best[0]:
            best = (err, amax * r)
    return best


def layer_input(members: list[Member], stats: InputStats, X: torch.Tensor,
                s: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """What the members' int8 path sees of the sample ``X``: ``X / s``, rotated when their
    scheme rotates the input (then ``W_hat`` is in the rotated basis too), and its absmax.
    The rotated absmax comes from the sample (which holds each batch's largest rows); the
    unrotated one from the running per-channel maxima over all tokens."""
    Xs = X if s is None else X / s
    rotation = members[0].scheme.weight.rotation
    if rotation is None:
        return Xs, float((stats.absmax if s is None else stats.absmax / s).amax())
    Xr = rotate(Xs.double(), rotation).float()
    return Xr, float(Xr.abs().amax()) if Xr.numel() else 0.0


def rtn_values(W: torch.Tensor, scheme) -> torch.Tensor:
    return dequantize(*quantize_weight(W, scheme.weight, scheme.observer))


def fake_activation(X: torch.Tensor, amax: float, scheme) -> torch.Tensor:
    if scheme.activation is None:
        return X
    if scheme.activation.mode == "dynamic":
        return fake_quantize(X, compute_qparams(X, "int8", "token"))
    t = torch.tensor(max(amax, 1e-8))
    return fake_quantize(X, qparams_from_range(-t, t, get_format("int8"), symmetric=True))
