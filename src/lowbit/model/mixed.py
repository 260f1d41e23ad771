"""Automatic mixed precision: per-layer formats under a bits-per-weight budget (``auto:<bpw>``).

1. Sensitivity (HAWQ, Dong et al., 2019, and llama.cpp's per-tensor type choice, in spirit):
   for each linear ``l`` and candidate format ``c``, the KL divergence ``D_l(c) =
   KL(p_fp || p_l,c)`` of the next-token distribution when *only* ``l`` is quantized
   (round to nearest) at ``c``, on a small calibration slice. Only the blocks from ``l``'s
   block on are re-run (their inputs are cached), and the KL is taken over the union of the
   baseline's top-``k`` tokens at every position (renormalised), which holds nearly all the
   mass and spares the 49k-wide head. Measuring every (layer, format) pair costs ``L x C``
   partial forwards; by default (``measure="anchor"``) ``D`` is measured at one anchor
   format (the candidate nearest the budget) and the others follow the second-order model
   ``KL ~ 1/2 d^T F d``: proportional to the layer's output error, estimated as
   ``e_l(c) = sum_ij (W - Q_c(W))_ij^2 E[x_j^2]``, so ``D_l(c) = D_l(a) e_l(c) / e_l(a)``.
   ``measure="all"`` measures every pair.
   For GPTQ and AWQ+GPTQ, round to nearest is the wrong stand-in (``solved_errors``): each
   layer is solved at every candidate against the float model's Hessian, ``D`` is measured
   with the solved weight and ``e_l(c) = tr(dW H dW^T)``, the error GPTQ minimises.
2. Allocation: minimise ``sum_l D_l(c_l)`` subject to ``sum_l bits_l(c_l) <= bpw * sum_l n_l``
   where ``bits_l`` counts codes, scales and zero-points as stored (``PackedWeight``). Each
   layer's options are reduced to their lower convex hull, then the upgrade with the best
   ``dD / dbits`` is taken while it fits (greedy Lagrangian, optimal on the hull), then any
   remaining upgrade that fits.
   The scoring itself is ``mixed_scoring.Scorer``; with ``ray=`` or ``$LOWBIT_RAY`` the
   layers are scored as Ray tasks (``mixed_ray.py``) and the table is the same.
3. The result is an explicit ``Recipe``: a default scheme plus one exact-name rule per layer
   that differs, readable and editable, round-tripping through JSON.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lowbit.model.distributed import ray_address
from lowbit.model.mixed_scoring import Scorer, group_stats, layer_bits, solve_candidate
from lowbit.model.recipe import Recipe, RecipeError, Rule, Scheme, budget_of
from lowbit.model.targets import find_targets

DEFAULT_CANDIDATES = ("w2g64", "w3g64", "w4g128", "w4g64", "w8")
#: algorithms whose candidates are scored after solving against the Hessian (GPTAQ's as
#: GPTQ's: the scoring has the float model's inputs only)
SOLVED = ("gptq", "gptaq", "awq+gptq")
__all__ = ["DEFAULT_CANDIDATES", "SOLVED", "Scorer", "allocate", "auto_recipe", "candidate_schemes",
           "layer_bits", "recipe_from_choice", "sensitivity", "solved_errors"]


def candidate_schemes(names, algorithm: str = "rtn", rotation: str | None = None,
                      options: tuple = ()) -> dict[str, Scheme]:
    out = {}
    for name in names:
        base = Recipe.parse(name).default
        weight = base.weight if rotation is None else replace(base.weight, rotation=rotation)
        out[name] = Scheme(weight, base.activation, algorithm, base.observer, options=options)
    return out


def sensitivity(model: nn.Module, batches: list, candidates: dict[str, Scheme],
                names: list[str], *, anchor: str, measure: str = "anchor", top_k: int = 32,
                progress: bool = True, solved: dict | None = None,
                ray: str | bool | None = None, folded: bool = False) -> dict[str, dict]:
    """``{layer: {"kl": {cand: D}, "bits": {cand: bits}, "numel": n}}`` (module docstring).

    ``solved`` (``solved_errors``): each layer's weights and errors as a calibrated algorithm
    produced them, used instead of round to nearest's. ``ray``: True / "local" scores the
    layers (x candidates with ``measure="all"``) as tasks on a local Ray cluster, an address
    on that cluster (default ``$LOWBIT_RAY``, else here; ``mixed_ray``); ``folded``: the model
    had its residual rotation folded in after loading (the workers repeat it)."""
    if measure not in ("anchor", "all"):
        raise RecipeError(f"measure must be 'anchor' or 'all', got {measure!r}")
    address = ray_address(ray)
    if address is not None:
        from lowbit.model.mixed_ray import sensitivity_on_ray

        out = sensitivity_on_ray(address, model, batches, candidates, names, anchor=anchor,
                                 measure=measure, top_k=top_k, progress=progress,
                                 solved=solved, folded=folded)
    else:
        scorer = Scorer(model, batches, names, top_k)
        kl_at = set(candidates) if measure == "all" else {anchor}
        items = names
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(names, desc="sensitivity", unit="layer", leave=False, disable=None)
        out = {name: scorer.score(name, candidates, kl_at, None if solved is None else
                                  solved[name]) for name in items}
    if measure == "anchor":
        for entry in out.values():
            ref_kl, ref_err = entry["kl"][anchor], max(entry["err"][anchor], 1e-30)
            for cand in candidates:
                entry["kl"].setdefault(cand, ref_kl * entry["err"][cand] / ref_err)
    return out


@torch.no_grad()
def solved_errors(model: nn.Module, batches: list, candidates: dict[str, Scheme],
                  names: list[str], *, keep: set[str], progress: bool = True,
                  ray: str | bool | None = None, folded: bool = False) -> dict[str, dict]:
    """``{layer: {"err": {cand: e}, "w_hat": {cand: W_hat}}}`` for a Hessian-solved algorithm.

    Round to nearest misjudges what GPTQ leaves of a format: in the Hadamard basis RTN at 3
    bits is worse than unrotated, GPTQ's far better, and GPTQ rescues 3 bits more than 2.
    So each layer is solved at every candidate (``algorithms.group.solve_group``, the calls the real
    run makes) against the Hessian of the float model's inputs, block by block, and scored
    by the output error ``e = tr(dW H dW^T)`` (GPTQ's objective, Frantar et al., 2022,
    eq. 1). ``W_hat`` (in the layer's own basis) is kept for the candidates in ``keep``.
    AWQ+GPTQ's group scale is not searched here: its layers are solved as GPTQ. ``ray``,
    ``folded``: as ``sensitivity``'s (each group x candidate a Ray task).
    """
    # scored with plain GPTQ: refinement lowers every candidate's error by a similar 7-12%
    # (algorithms/refine.py) and would multiply this pass's solves
    candidates = {c: replace(s, options={**dict(s.options), "refine_passes": 0})
                  for c, s in candidates.items()}
    address = ray_address(ray)
    if address is not None:
        from lowbit.model.mixed_ray import solved_on_ray

        return solved_on_ray(address, model, batches, candidates, names, keep=keep,
                             progress=progress, folded=folded)
    out: dict[str, dict] = {}
    groups = group_stats(model, batches, names)
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="solving candidates", unit="group", leave=False,
                      disable=None)
    for group, st in groups:
        for n in group:
            out[n] = {"err": {}, "w_hat": {}}
        for cand, scheme in candidates.items():
            for n, (err, w_hat) in solve_candidate(model, group, st, scheme,
                                                   cand in keep).items():
                out[n]["err"][cand] = err
                if w_hat is not None:
                    out[n]["w_hat"][cand] = w_hat
    return out


def _hull(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bits, kl) points, cheapest first, kl strictly decreasing."""
    pts = sorted(points)
    hull: list = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bits, no better
        while len(hull) >= 2:
            (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
            if (k2 - k1) * (p[0] - b1) >= (p[1] - k1) * (b2 - b1):  # b2 above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(sens: dict[str, dict], bpw: float) -> dict[str, str]:
    """The candidate per layer minimising summed KL within ``bpw`` (module docstring).

    The greedy walk can strand budget when one layer's step is large (a 49k-row head is a
    fifth of SmolLM2): its upgrade stops fitting and the rest goes to small steps. So each
    option of every layer holding at least ``BIG`` of the weights is also tried fixed, the
    others allocated greedily around it, and the lowest summed KL wins."""
    numel = sum(e["numel"] for e in sens.values())
    budget = bpw * numel
    hulls = {n: _hull([(e["bits"][c], e["kl"][c], c) for c in e["bits"]]) for n, e in
             sens.items()}
    best = _greedy(hulls, budget)
    if best is None:  # each hull starts at its layer's cheapest candidate
        used = sum(h[0][0] for h in hulls.values())
        raise RecipeError(f"a budget of {bpw:g} bits per weight is below the smallest candidate "
                          f"format ({used / numel:.3f} bits per weight with scales and "
                          f"zero-points); raise the budget or add a smaller candidate format")
    for n, h in hulls.items():
        if sens[n]["numel"] < BIG * numel:
            continue
        for point in h:
            fixed = _greedy({**hulls, n: [point]}, budget)
            if fixed is not None and fixed[0] < best[0]:
                best = fixed
    return best[1]


#: the share of the weights from which a layer's options are each tried fixed (``allocate``)
BIG = 0.05


def _greedy(hulls: dict[str, list], budget: float) -> tuple[float, dict[str, str]] | None:
    """(summed KL, choice): from each hull's cheapest point, the upgrade with the best KL saved
    per extra bit that still fits, until none does (None if the cheapest points do not fit)."""
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0][0] for h in hulls.values())
    if used > budget * (1 + 1e-9):
        return None
    while True:
        best = None
        for n, h in hulls.items():
            i = pos[n]
            if i + 1 < len(h):
                db, dk = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
                if used + db <= budget and (best is None or dk / db > best[0]):
                    best = (dk / db, n, db)
        if best is None:
            break
        _, n, db = best
        pos[n] += 1
        used += db
    return (sum(h[pos[n]][1] for n, h in hulls.items()),
            {n: h[pos[n]][2] for n, h in hulls.items()})


def recipe_from_choice(choice: dict[str, str], schemes: dict[str, Scheme], name: str,
                       keep: tuple[str, ...] = (), compute_dtype: str = "auto") -> Recipe:
    """An explicit recipe: the most common scheme as default, one rule per other layer."""
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c] = counts.get(c, 0) + 1
    default = max(counts, key=counts.get)
    rules = tuple(Rule(n, schemes[c]) for n, c in choice.items() if c != default)
    return Recipe(name, schemes[default], rules, keep, compute_dtype)


def auto_recipe(model: nn.Module, recipe: Recipe, batches: list | None, *,
                candidates=DEFAULT_CANDIDATES, measure: str = "anchor",
                sensitivity_tokens: int = 256, solved_tokens: int = 8192,
                progress: bool = True, sens: dict | None = None,
                ray: str | bool | None = None) -> Recipe:
    """Resolve an ``auto:<bpw>`` placeholder into an explicit per-layer recipe.

    Sensitivity runs on the first ``sensitivity_tokens`` tokens of ``batches``; for GPTQ and
    AWQ+GPTQ the candidates' weights and errors come from solving each layer on the first
    ``solved_tokens`` tokens (``solved_errors``, with the recipe's algorithm options). The chosen
    recipe is returned and its sensitivity table is kept on ``model.lowbit_sensitivity``.
    ``ray``: where the layers are scored (``sensitivity``; default ``$LOWBIT_RAY``, else here).
    """
    bpw = budget_of(recipe)
    algorithm = recipe.default.algorithm if recipe.default is not None else "rtn"
    rotation = recipe.default.weight.rotation if recipe.default is not None else None
    options = recipe.default.options if recipe.default is not None else ()
    schemes = candidate_schemes(candidates, algorithm, rotation, options)
    names = [n for n, _, s in find_targets(model, recipe) if s is not None]
    if sens is None:
        if not batches:
            raise RecipeError(f"{recipe.name} measures each layer's sensitivity on calibration "
                              f"data: pass calibration=lowbit.data.text('default', tokenizer)")
        slice_ = _slice(batches, sensitivity_tokens)
        rtn = candidate_schemes(candidates, "rtn", rotation)
        anchor = min(candidates, key=lambda c: abs(_nominal_bits(rtn[c]) - bpw))
        solved = None
        if algorithm in SOLVED:
            keep = set(candidates) if measure == "all" else {anchor}
            solved = solved_errors(model, _slice(batches, solved_tokens), schemes, names,
                                   keep=keep, progress=progress, ray=ray,
                                   folded=recipe.fold_rotation is not None)
        sens = sensitivity(model, slice_, rtn, names, anchor=anchor, measure=measure,
                           progress=progress, solved=solved, ray=ray,
                           folded=recipe.fold_rotation is not None)
    model.lowbit_sensitivity = sens
    choice = allocate({n: sens[n] for n in names}, bpw)
    return recipe_from_choice(choice, schemes, f"mixed-{bpw:g}bpw" + (
        f"-{algorithm}" if algorithm != "rtn" else "") + ("-rot" if rotation else ""),
        recipe.keep, recipe.compute_dtype)


def _nominal_bits(scheme: Scheme) -> float:
    from lowbit.formats import get_format

    fmt = get_format(scheme.weight.format)
    gran = scheme.weight.granularity
    zero = 8 if scheme.weight.integer_zero_point else 32
    return fmt.bits + ((16 + zero) / gran.group_size if gran.kind == "group" else 0)


def _slice(batches: list, tokens: int) -> list:
    out, total = [], 0
    for b in batches:
        if total >= tokens:
            break
        if isinstance(b, torch.Tensor) and b.dim() == 2:
            b = b[:, : max(2, -(-(tokens - total) // b.shape[0]))]
        out.append(b)
        total += b.numel() if isinstance(b, torch.Tensor) else tokens
    return out
