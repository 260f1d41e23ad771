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
  ``static_groups`` all group parameters come up front from the original ``W``, always so
  for a super-block scale dtype (llama.cpp's k-quants, ``formats.superblock``: the groups
  of 256 inputs share one float16 scale, so their parameters are chosen together);
- ``clip_ratios`` (the reference's ``Quantizer(mse=True)``): each group's min/max range is
  shrunk by the ratio with the least ``sum |w - q(w)|^2.4`` over its elements (a recipe
  asks for it with ``observer: mse``).

``hessian_shrink`` (lowbit's recipes: 0.3) first replaces ``H`` by ``(1 - a) H + a diag(H)``,
the shrinkage estimator toward the diagonal target (Ledoit and Wolf, "A well-conditioned
estimator for large-dimensional covariance matrices", J. Multivariate Analysis 2004): the
calibration text's cross-input correlations are trusted in part, so less error is pushed
into directions that text rarely excites (``a = 1`` is per-input weighted rounding).

``refine_passes`` then lowers the same objective from GPTQ's solution (``refine.py``):
each pass refits every row's group scales (and float zero-points) by least squares under
``H`` with the codes fixed, then runs one sweep of QuantEase coordinate descent over the
codes with the parameters fixed (Behdin et al., 2023, Algorithm 1).

Each column is quantized through ``scaling.quantize`` / ``dequantize`` with that column's
parameters, so any format works: integer, float, lookup (NF4, codebooks); integer formats
take an inlined copy of the same arithmetic (``IntColumn``, tested bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.base import AlgorithmError, HessianAccumulator, QuantResult, check_weight
from lowbit.algorithms.gptq_columns import (
    AnyColumn,
    GroupParams,
    IntColumn,
    clipped_qparams,
    column_qparams,
    solve_blocks,
)
from lowbit.algorithms.refine import refine as refine_solution
from lowbit.algorithms.registry import Algorithm, register
from lowbit.formats.integer import IntFormat
from lowbit.formats.spec import WeightSpec
from lowbit.formats.superblock import super_scale
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
    #: (``kernels/native_solve.py``); False = the torch loops, the reference
    native: bool = True
    #: shrink ``H`` toward its diagonal, ``(1 - a) H + a diag(H)`` (Ledoit & Wolf, 2004,
    #: the diagonal target): 0 = GPTQ's ``H``, 1 = no cross-input terms (per-input weighted
    #: rounding); trusts less of the calibration text's input correlations
    hessian_shrink: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp <= self.max_percdamp:
            raise AlgorithmError(
                f"need 0 <= percdamp <= max_percdamp, got {self.percdamp}, {self.max_percdamp}"
            )
        if self.block_size < 1:
            raise AlgorithmError(f"block_size must be >= 1, got {self.block_size}")
        if self.refine_passes < 0:
            raise AlgorithmError(f"refine_passes must be >= 0, got {self.refine_passes}")
        if not 0 <= self.hessian_shrink <= 1:
            raise AlgorithmError(f"hessian_shrink must be in [0, 1], got {self.hessian_shrink}")

    def quantize(
        self, W: torch.Tensor, H: torch.Tensor | HessianAccumulator, config: WeightSpec
    ) -> QuantResult:
        W = check_weight(W).clone()
        nsamples = H.nsamples if isinstance(H, HessianAccumulator) else None
        H = _check_hessian(H, W)
        shrink_to_diagonal(H, self.hessian_shrink)
        rows, cols = W.shape
        gran, fmt = config.granularity, config.fmt

        dead = torch.diagonal(H) == 0  # inputs that never fired
        H[dead, dead] = 1
        W[:, dead] = 0

        lazy = gran.kind == "group" and not self.static_groups and \
            super_scale(config.scale_dtype) is None
        gs = gran.group_size if gran.kind == "group" else cols
        # per-tensor / per-channel / static groups: parameters up front from W
        upfront = None if lazy else clipped_qparams(W, config, config.granularity, self.clip_ratios,
                                                       self.clip_norm)
        groups = GroupParams(rows, -(-cols // gs), config, self.clip_ratios,
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
        column = IntColumn(fmt, rows) if integer else AnyColumn()
        params_of = groups.column if lazy else lambda g: column_qparams(upfront, g)
        native = self.native and column.native and native_solve.usable(W, Hinv)
        solve_blocks(W, Hinv, codes, losses, group_of, invperm, gs, groups, column, params_of,
                     self.block_size, native)
        loss = float(losses.sum())
        del losses, W  # the per-column losses and the error-fed working copy: done with
        codes = codes[:, invperm]
        if integer:
            codes = codes.to(fmt.code_dtype)
        qparams = groups.qparams(gran) if lazy else upfront
        refined = None
        if refine:
            del Hinv
            H.diagonal().add_(used_damp * float(torch.diagonal(H).mean()))

            def columns(qp):
                fresh = IntColumn(fmt, rows) if integer else AnyColumn()
                return fresh, lambda g: column_qparams(qp, g)

            codes, qparams, refined = refine_solution(W0, H.to(W0.dtype), codes, qparams,
                                                      self.refine_passes, self.block_size,
                                                      columns, self.native)
        info = {
            "algorithm": "gptq",
            "loss": loss,
            "percdamp": used_damp,
            "dead_inputs": int(dead.sum()),
            "act_order": self.act_order,
        }
        if refined is not None:
            info.update(refined)
        return QuantResult(codes, qparams, info=info)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor | HessianAccumulator,
    config: WeightSpec,
    **options,
) -> QuantResult:
    """GPTQ-quantize ``W`` ``[out, in]`` given ``H`` ``[in, in]``; ``options`` are ``GPTQ``'s."""
    return GPTQ(**options).quantize(W, H, config)


def shrink_to_diagonal(H: torch.Tensor, a: float) -> torch.Tensor:
    """``H <- (1 - a) H + a diag(H)`` in place (``hessian_shrink``); returns ``H``."""
    if a:
        diag = H.diagonal().clone()
        H.mul_(1 - a).diagonal().copy_(diag)
    return H


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
    the order ``perm``, or as they are), escalating the damping on failure; row-major.

    Without forming the inverse: with ``J`` the order reversal and ``J H J = L L^T``,
    ``H = R R^T`` for the upper triangular ``R = J L J``, so ``H^-1 = (R^-1)^T R^-1`` and the
    factor is ``R^-1 = J L^-1 J``: one Cholesky and one triangular solve (2.4 s at 4864
    columns, where ``cholesky_inverse`` and a second Cholesky took 7-18 s)."""
    mean_diag = float(torch.diagonal(H).mean())
    order = (torch.arange(len(H), device=H.device) if perm is None else perm).flip(0)
    damp = percdamp
    while True:
        Hd = H[order[:, None], order]  # (one gather, in reverse order)
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            eye = torch.eye(len(L), dtype=L.dtype, device=L.device)
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            del L, eye
            if torch.isfinite(U).all():
                return U.float().contiguous(), damp
        nxt = damp * 10 if damp > 0 else 0.01
        if nxt > max_percdamp * (1 + 1e-9):
            seen = f" from {nsamples} tokens" if nsamples is not None else ""
            raise AlgorithmError(
                f"GPTQ: the Hessian of the layer with weight shape {tuple(W.shape)}{seen} is "
                f"not positive definite even with percdamp={damp:g}; calibrate on more (and "
                f"more varied) data, or raise max_percdamp / percdamp"
            )
        damp = nxt


#: GPTQ with ``observer: mse``: each group's range shrunk by the best of these (IST-DASLab
#: gptq ``Quantizer(mse=True)`` searches 1.0 down to 0.2 in 100 steps; 0.8 is far enough here)
GPTQ_CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(11))

#: lowbit's recipes: act-order, then 2 rounds of refinement (``algorithms/refine.py``): on
#: SmolLM2 w3g64-gptq-rot +26.5% -> +18.2% (16k calibration tokens, 8 windows); the Hessian
#: shrunk 0.3 toward its diagonal, chosen on text calibration never saw (the least mean KLD
#: on idle-news and email of 0, 0.3, 0.6; benchmarks/calibration_domains.py, docs/results.md)
RECIPE_DEFAULTS = (("act_order", True), ("refine_passes", 2), ("hessian_shrink", 0.3))


def _solve(W, scheme, stats, s, options: GPTQ):
    """GPTQ (and GPTAQ, AWQ+GPTQ) on ``W diag(s)``: the Hessian of the scaled input, in the
    rotated basis when the scheme rotates (QuaRot sec. 4)."""
    from lowbit.algorithms.gptaq import asymmetric_target
    from lowbit.algorithms.stats import rotate_weight_and_hessian

    spec, algo = scheme.weight, scheme.algorithm
    H = stats.hessian.H
    H = H if s is None else H / (s[:, None] * s[None, :])
    if algo == "gptaq" and stats.cross is not None:  # the float model's output
        W = asymmetric_target(W, H, stats.cross, options.percdamp)
    if scheme.observer == "mse" and not options.clip_ratios:  # each group's range searched
        options = replace(options, clip_ratios=GPTQ_CLIP_RATIOS)
    if spec.rotation is not None:  # shrunk toward the diagonal of the inputs as they come
        # (outlier channels and all), not of the rotated inputs, whose diagonal is flat
        H = shrink_to_diagonal(H.clone(), options.hessian_shrink)
        options = replace(options, hessian_shrink=0.0)
        W, H = rotate_weight_and_hessian(W, H, spec.rotation)
    res = options.quantize(W, H, replace(spec, rotation=None))
    if algo == "gptaq":  # say which objective this layer got
        res.info.update({"algorithm": "gptaq"} if stats.cross is not None else {
            "fallback": "gptaq has no float-model path for this layer (outside the blocks, "
                        "e.g. the head): used GPTQ"})
    return res.codes, res.qparams, dict(res.info)


def _awq_scale(members, stats, options):
    from lowbit.algorithms.awq_search import awq_group_scale

    return awq_group_scale(members, stats, options)


register(Algorithm("gptq", "Hessian error compensation, column by column (Frantar et al., "
                   "2022, Alg. 1), act-order and refinement", _solve, GPTQ, RECIPE_DEFAULTS,
                   frozenset({"hessian"}), needs_data=True, rotates=True))
register(Algorithm("gptaq", "GPTQ toward the float model's outputs (asymmetric calibration)",
                   _solve, GPTQ, RECIPE_DEFAULTS, frozenset({"hessian", "cross"}),
                   needs_data=True, rotates=True))
register(Algorithm("awq+gptq", "AWQ's input scale for the group, then GPTQ on W diag(s)",
                   _solve, GPTQ, RECIPE_DEFAULTS, frozenset({"hessian", "absmean"}),
                   needs_data=True, input_scale="awq", search=_awq_scale, rotates=True))
