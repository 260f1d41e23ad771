"""One group of linears that share an input: statistics in, quantized layers out.

``calibrated.py`` walks the blocks and collects ``InputStats`` for each group; this module
turns them into ``Solution`` objects by calling the layer-4 algorithms:

| algorithm | statistics | call |
|---|---|---|
| ``rtn`` | none | ``quantize_weight`` (min/max or MSE observer) |
| ``gptq`` | ``H = 2/n X^T X`` | ``algorithms.gptq_solver`` (Frantar et al., 2022, Alg. 1) |
| ``gptaq`` | ``H``, ``2/n X~^T X`` (float model's ``X``) | GPTQ on ``algorithms.gptaq``'s target |
| ``awq`` | ``H``, mean abs x | ``algorithms.awq_search``: scales on the group, clipping per layer |
| ``awq+gptq`` | ``H``, mean abs x | AWQ's scale search on the group, then GPTQ on ``W diag(s)`` |
| ``imatrix`` | ``diag(H) / 2 = mean x^2`` | ``algorithms.importance_rtn`` (llama.cpp imatrix) |
| ``hqq`` | none | ``algorithms.hqq_solver`` (float zero-point, stored in fp16) |
| ``kmeans`` | ``mean x^2`` if data is given | ``algorithms.kmeans_codebook`` (SqueezeLLM eq. 4-5) |
| ``smoothquant`` | max abs x, a token sample | ``algorithms.smoothquant_scales`` + alpha search |

Input scaling. AWQ and SmoothQuant pick a factor ``s`` per input channel for the whole group
and every member then quantizes ``W diag(s)`` while its input becomes ``x / s``; the group's
feeder absorbs ``1/s``. Statistics of ``x`` map exactly: ``H_s = diag(s)^-1 H diag(s)^-1``,
``mean (x/s)^2 = mean x^2 / s^2``. So AWQ scales combine with GPTQ or imatrix members.

AWQ on ``H``. AWQ's losses (Lin et al., 2023, eq. 4 and the clipping error) are quadratic
forms in the calibration inputs: ``sum_t (x_t . d)^2 = d^T (X^T X) d``. Any ``U`` with
``U^T U = X^T X / n`` (the Cholesky factor of ``H / 2``) gives the same losses up to a constant
factor, so ``awq`` receives ``U`` (``in`` rows) instead of ``n`` tokens: exact, and the cost
no longer grows with the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.algorithms import (
    AlgorithmError,
    HessianAccumulator,
    awq,
    gptq,
    hqq,
    importance_rtn,
    kmeans,
    smoothquant_scales,
)
from lowbit.algorithms.gptaq import asymmetric_target
from lowbit.formats import (
    compute_qparams,
    dequantize,
    fake_quantize,
    get_format,
    qparams_from_range,
    rotate,
)
from lowbit.model.recipe import RecipeError, Scheme
from lowbit.nn import QuantizedLinear, WeightSpec
from lowbit.nn.codebook import is_row_codebook, packed_codebook

NEEDS = {  # statistics each algorithm reads
    "rtn": set(), "hqq": set(), "kmeans": {"diag"}, "imatrix": {"diag"},
    "gptq": {"hessian"}, "gptaq": {"hessian", "cross"}, "awq": {"hessian", "absmean"},
    "awq+gptq": {"hessian", "absmean"},
    "smoothquant": {"absmax", "sample"},
}


#: GPTQ with ``observer: mse``: each group's range shrunk by the best of these (IST-DASLab
#: gptq ``Quantizer(mse=True)`` searches 1.0 down to 0.2 in 100 steps; 0.8 is far enough here)
GPTQ_CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(11))

#: rows with the largest entries kept in every batch's token sample (``InputStats.add``)
TOP_ROWS = 8


def stats_needed(scheme: Scheme) -> set[str]:
    need = set(NEEDS[scheme.algorithm])
    if scheme.activation is not None and scheme.activation.mode == "static":
        need |= {"absmax", "sample"}
    return need


class InputStats:
    """Running statistics of one input (shared by the members of a group)."""

    def __init__(self, width: int, need: set[str], sample_per_batch: int = 0):
        self.width, self.need, self.n = width, need, 0
        self.hessian = HessianAccumulator(width) if "hessian" in need else None
        #: GPTAQ's cross moment ``2/n sum x~ x^T`` with the float model's inputs ``x``
        #: (``algorithms/gptaq.py``), averaged like the Hessian; None until both are seen
        self.cross = None
        self.sq = torch.zeros(width, dtype=torch.float64)
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.absmax = torch.zeros(width)
        self.samples: list[torch.Tensor] = []
        self.sample_per_batch = sample_per_batch
        self._gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Fold in one batch of inputs ``x``; ``x_float``: the float model's inputs to the
        same layer for the same tokens (GPTAQ's cross moment)."""
        x = x.detach().reshape(-1, self.width).float()
        self.n += x.shape[0]
        if self.hessian is not None:
            self.hessian.add_batch(x)
        if "cross" in self.need and x_float is not None:
            xf = x_float.detach().reshape(-1, self.width).float()
            if self.cross is None:
                self.cross = torch.zeros(self.width, self.width)
            n = self.hessian.nsamples  # (the Hessian's running average, same tokens)
            self.cross.addmm_(x.T, xf, beta=(n - x.shape[0]) / n, alpha=2.0 / n)
        if self.hessian is None:  # (with a Hessian, mean x^2 is its diagonal / 2)
            self.sq += x.pow(2).sum(0, dtype=torch.float64)
        if "absmean" in self.need:
            self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if "absmax" in self.need:
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if "sample" in self.need and self.sample_per_batch:
            # random rows (seeded) plus the rows with the largest entries: the rare tokens
            # with massive activations set a static range, so the sample must hold them
            pick = torch.randperm(x.shape[0], generator=self._gen)[: self.sample_per_batch]
            top = x.abs().amax(1).topk(min(x.shape[0], TOP_ROWS)).indices
            self.samples.append(x[torch.cat([pick, top]).unique()].clone())

    @property
    def mean_square(self) -> torch.Tensor:
        if self.hessian is not None:
            return self.hessian.mean_square.float()
        return (self.sq / max(self.n, 1)).float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.width)


@dataclass
class Member:
    name: str
    module: nn.Module  # the float nn.Linear
    scheme: Scheme


@dataclass
class Solution:
    """What one linear becomes: codes + parameters (or a codebook), ready to build."""

    spec: WeightSpec
    scheme: Scheme
    bias: torch.Tensor | None
    codes: torch.Tensor
    qparams: object = None  # QParams, or the centroids tensor for codebooks
    input_qparams: object = None
    info: dict = field(default_factory=dict)

    @property
    def is_codebook(self) -> bool:
        return is_row_codebook(get_format(self.spec.format))

    def can_scale_rows(self) -> bool:
        gran = self.spec.granularity
        return gran.kind in ("channel", "group") and self.spec.scale_dtype != "e8m0"

    def scale_rows(self, r: torch.Tensor) -> None:
        """Multiply every output row by ``r`` (a feeder absorbing ``1/s``): scales, tables, bias."""
        if self.is_codebook:
            shape = (-1,) + (1,) * (self.qparams.dim() - 1)
            self.qparams = self.qparams * r.reshape(shape)
        else:
            scale = self.qparams.scale
            new = (scale.float() * r.reshape((-1,) + (1,) * (scale.dim() - 1))).to(scale.dtype)
            self.qparams = replace(self.qparams, scale=new)
        if self.bias is not None:
            self.bias = self.bias * r

    def build(self, backend: str | None = None) -> QuantizedLinear:
        if self.is_codebook:
            packed = packed_codebook(self.codes, self.qparams, self.spec)
            return QuantizedLinear(packed, self.spec, self.bias, backend=backend)
        return QuantizedLinear.from_codes(
            self.codes, self.qparams, self.spec, self.bias, activation=self.scheme.activation,
            input_qparams=self.input_qparams, backend=backend)


def weight_config(spec: WeightSpec) -> WeightSpec:
    """``spec`` as the algorithms see it: the input rotation is applied before they run."""
    return replace(spec, rotation=None)


def _sqrt_gram(H: torch.Tensor) -> torch.Tensor:
    """``U`` with ``U^T U = H / 2`` (upper Cholesky factor), jittered when singular."""
    sigma = H.double() / 2
    jitter = 1e-8 * float(sigma.diagonal().mean().clamp_min(1e-30))
    for _ in range(8):
        eye = torch.eye(len(sigma), dtype=sigma.dtype)
        L, info = torch.linalg.cholesky_ex(sigma + jitter * eye)
        if int(info) == 0:
            return L.T.float().contiguous()
        jitter *= 100
    raise AlgorithmError("the input covariance is not positive semi-definite (NaN in data?)")


@dataclass
class Solver:
    """Options of every algorithm (passed through to layer 4) and of the scale searches."""

    #: GPTQ with act-order, then 2 rounds of refinement (``algorithms/refine.py``): on
    #: SmolLM2 w3g64-gptq-rot +26.5% -> +18.2% (16k calibration tokens, 8 windows)
    gptq: dict = field(default_factory=lambda: {"act_order": True, "refine_passes": 2})
    awq: dict = field(default_factory=dict)
    hqq: dict = field(default_factory=dict)
    kmeans: dict = field(default_factory=dict)
    imatrix: dict = field(default_factory=dict)
    smooth_alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    act_clip_ratios: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6)

    # -- input scale of the group --------------------------------------------------------
    def group_scale(self, members: list[Member], stats: InputStats | None, foldable: bool):
        """``s`` for the group (None = no scaling) and what the search found."""
        algos = {m.scheme.algorithm for m in members}
        awq_like = {"awq", "awq+gptq"}
        if algos & awq_like and "smoothquant" in algos:
            raise RecipeError(f"{', '.join(m.name for m in members)} share one input, so they "
                              f"cannot mix AWQ and SmoothQuant scales: pick one")
        if not foldable or stats is None:
            return None, {}
        if algos & awq_like:
            mm = [m for m in members if m.scheme.algorithm in awq_like]
            W = torch.cat([m.module.weight.detach().float() for m in mm])
            cfg = min((weight_config(m.scheme.weight) for m in mm), key=lambda c: c.fmt.bits)
            opts = {k: v for k, v in self.awq.items() if k in ("n_grid",)}
            rotations = {m.scheme.weight.rotation for m in mm}
            if len(rotations) > 1:
                raise RecipeError(f"{', '.join(m.name for m in mm)} share one input, so they "
                                  f"share one AWQ scale: rotate all of them or none")
            res = awq(W, _sqrt_gram(stats.hessian.H), cfg, act_scale=stats.abs_mean,
                      clip=False, rotation=rotations.pop(), **opts)
            return res.input_scale, {"awq_alpha": res.info["alpha"]}
        if "smoothquant" in algos:
            return self._smooth_search(members, stats)
        return None, {}

    def _smooth_search(self, members, stats):
        """SmoothQuant eq. 4 with alpha chosen per group by the simulated W8A8 output error
        ``||Q_a(X/s) Q_w(W s)^T - X W^T||^2`` on a token sample; ``s = 1`` competes too."""
        X = stats.sample()
        weights = [m.module.weight.detach().float() for m in members]
        ref = [X @ W.T for W in weights]
        best = (float("inf"), None, None)
        for alpha in (None, *self.smooth_alphas):
            s = None if alpha is None else smoothquant_scales(stats.absmax, weights, alpha)
            w_hat = [_rtn_values(W if s is None else W * s, m.scheme)
                     for W, m in zip(weights, members, strict=True)]
            Xs, amax = _layer_input(members, stats, X, s)
            err, _ = self._best_clip(members, Xs, amax, w_hat, ref)
            if err < best[0]:
                best = (err, s, alpha)
        return best[1], {"smooth_alpha": best[2]}

    def _best_clip(self, members, Xs, amax, w_hat, ref):
        """Static per-tensor activation range: the clip ratio with the least output error."""
        act = members[0].scheme.activation
        ratios = self.act_clip_ratios if act is not None and act.mode == "static" else (1.0,)
        best = (float("inf"), amax)
        for r in ratios:
            xq = _fake_act(Xs, amax * r, members[0].scheme)
            err = sum(float((xq @ w.T - y).pow(2).sum()) for w, y in zip(w_hat, ref, strict=True))
            if err < best[0]:
                best = (err, amax * r)
        return best

    # -- members ---------------------------------------------------------------------------
    def solve_group(self, members: list[Member], stats: InputStats | None,
                    s: torch.Tensor | None) -> list[Solution]:
        """Quantize each member's ``W diag(s)`` with its algorithm. Members with the same
        scheme and per-row parameters are solved as one stacked weight: GPTQ, AWQ clipping,
        imatrix, HQQ and k-means treat rows independently given the shared input, so the
        result is the same and the per-column work and ``H^-1`` are paid once."""
        batches: dict = {}
        for m in members:
            per_row = m.scheme.weight.granularity.kind != "tensor"
            key = (m.scheme, m.module.in_features) if per_row else (m.name,)
            batches.setdefault(key, []).append(m)
        out = {}
        for batch in batches.values():
            W = torch.cat([m.module.weight.detach().float() for m in batch])
            name = ", ".join(m.name for m in batch)
            codes, params, info = self._quantize(W, batch[0].scheme, stats, s, name)
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
                sol = Solution(m.scheme.weight, m.scheme, bias, codes[rows], part,
                               info=dict(info))
                if len(batch) > 1:
                    sol.info["solved_with"] = name
                if s is not None:
                    sol.info["input_scale_max"] = float(s.max())
                out[m.name] = sol
        return [out[m.name] for m in members]

    def _quantize(self, W, scheme, stats, s, name):
        """(codes, QParams or centroids, info) for ``W diag(s)`` under ``scheme``."""
        from lowbit.model.pipeline import quantize_weight

        spec, algo = scheme.weight, scheme.algorithm
        Ws = W if s is None else W * s
        if is_row_codebook(get_format(spec.format)):
            if algo not in ("kmeans", "rtn"):
                raise RecipeError(f"{name}: codebook formats are built by k-means; use "
                                  f"algorithm 'kmeans' (got {algo!r})")
            imp = None if stats is None else _scaled_diag(stats, s)
            res = kmeans(Ws, get_format(spec.format).bits, spec.granularity, importance=imp,
                         **self.kmeans)
            return res.codes, res.centroids, res.info
        cfg = weight_config(spec)
        try:
            if algo in ("rtn", "smoothquant") or (stats is None and algo != "hqq"):
                codes, qp = quantize_weight(Ws, scheme)
                info = {"algorithm": algo if algo == "smoothquant" else "rtn"}
                if algo not in ("rtn", "smoothquant"):
                    info["fallback"] = f"{algo} needs calibration statistics: used RTN"
                return codes, qp, info
            if algo in ("gptq", "gptaq", "awq+gptq"):  # (awq+gptq: the AWQ scale is in s)
                H = stats.hessian.H
                H = H if s is None else H / (s[:, None] * s[None, :])
                opts = dict(self.gptq)
                if algo == "gptaq" and stats.cross is not None:  # the float model's output
                    Ws = asymmetric_target(Ws, H, stats.cross, opts.get("percdamp", 0.01))
                if scheme.observer == "mse":  # each group's range: the clipping search
                    opts.setdefault("clip_ratios", GPTQ_CLIP_RATIOS)
                if spec.rotation is not None:  # GPTQ in the rotated basis (QuaRot sec. 4)
                    Ws, H = rotate_weight_and_hessian(Ws, H, spec.rotation)
                res = gptq(Ws, H, cfg, **opts)
                if algo == "gptaq":  # say which objective this layer got
                    res.info.update({"algorithm": "gptaq"} if stats.cross is not None else {
                        "fallback": "gptaq has no float-model path for this layer (outside "
                                    "the blocks, e.g. the head): used GPTQ"})
            elif algo == "awq":  # clipping search only: the group's scale is already in s
                U = _sqrt_gram(stats.hessian.H)
                res = awq(Ws, U if s is None else U / s, cfg, n_grid=1,
                          n_clip_tokens=U.shape[0],
                          **{k: v for k, v in self.awq.items() if k != "n_grid"})
            elif algo == "imatrix":
                res = importance_rtn(Ws, _scaled_diag(stats, s), cfg, **self.imatrix)
            else:  # hqq
                res = hqq(Ws, cfg, **self.hqq)
        except AlgorithmError as exc:
            raise AlgorithmError(f"{name}: {exc}") from exc
        qp = res.qparams
        if algo == "hqq" and qp.zero_point is not None and qp.zero_point.is_floating_point():
            # HQQ's zero-point is a float by design (its code keeps fp16): fp16 beside a
            # 16-bit scale, float32 beside a float32 one; other algorithms follow the spec
            zdtype = torch.float32 if spec.scale_dtype == "fp32" else torch.float16
            qp = replace(qp, zero_point=qp.zero_point.to(zdtype))
        return res.codes, qp, dict(res.info)

    def static_input(self, members, sols, stats, s) -> None:
        """Calibrated per-tensor int8 input scale for static-activation members."""
        static = [(m, sol) for m, sol in zip(members, sols, strict=True)
                  if m.scheme.activation is not None and m.scheme.activation.mode == "static"]
        if not static:
            return
        X = stats.sample()
        Xs, amax = _layer_input([m for m, _ in static], stats, X, s)
        w_hat = [dequantize(sol.codes, sol.qparams) for _, sol in static]
        ref = [X @ m.module.weight.detach().float().T for m, _ in static]
        _, amax = self._best_clip([m for m, _ in static], Xs, amax, w_hat, ref)
        amax_t = torch.tensor(max(amax, 1e-8))
        for _, sol in static:
            sol.input_qparams = qparams_from_range(-amax_t, amax_t, get_format("int8"),
                                                   symmetric=True)
            sol.info["act_amax"] = amax


def rotate_weight_and_hessian(W: torch.Tensor, H: torch.Tensor, rotation: str):
    """``(W R, R^T H R)``: the weight and input Hessian seen by a layer that rotates its input
    ``x -> x R`` (``formats.rotation``), since ``x W^T = (x R)(W R)^T``. GPTQ on them is
    "GPTQ on the rotated model" (QuaRot, Ashkboos et al., 2024, sec. 4; QuIP's incoherence
    processing, Chee et al., 2023, sec. 3): the rotation spreads outlier input channels, so
    every group holds weights of similar size. Computed in float64."""
    Wr = rotate(W.double(), rotation).float()
    Hr = rotate(rotate(H.double(), rotation).T.contiguous(), rotation)
    return Wr, ((Hr + Hr.T) / 2).float()


def _layer_input(members: list[Member], stats: InputStats, X: torch.Tensor,
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


def _rtn_values(W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    from lowbit.model.pipeline import quantize_weight

    return dequantize(*quantize_weight(W, scheme))


def _scaled_diag(stats: InputStats, s: torch.Tensor | None) -> torch.Tensor:
    d = stats.mean_square
    return d if s is None else d / s.pow(2)


def _fake_act(X: torch.Tensor, amax: float, scheme: Scheme) -> torch.Tensor:
    if scheme.activation is None:
        return X
    if scheme.activation.mode == "dynamic":
        return fake_quantize(X, compute_qparams(X, "int8", "token"))
    t = torch.tensor(max(amax, 1e-8))
    return fake_quantize(X, qparams_from_range(-t, t, get_format("int8"), symmetric=True))
