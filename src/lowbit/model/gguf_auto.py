"""``gguf:auto:<size>[-<algorithm>]``: llama.cpp types chosen per tensor by measured
sensitivity, within the bytes llama-quantize's file type ``<size>`` gives the same tensors.

llama-quantize's mixes (``gguf_mixes``) give extra bits by tensor role and depth alone (attn_v
and ffn_down of the first and last eighth of the layers...). This recipe spends the same bytes
where the model measures they buy most, as ``auto:<bpw>`` does with lowbit's own formats
(``mixed.py``: HAWQ-style sensitivity, Dong et al., 2019, and a greedy Lagrangian allocation
on each layer's lower convex hull), with three differences:

- each layer's options are the llama.cpp types its rows can hold (``CANDIDATES`` after
  llama.cpp's fallback for rows that are not a multiple of 256, ``fit_row_length``; types that
  fall back to the same grid are solved once);
- a layer's bits are the bytes its GGUF tensor takes (``gguf_grids.BLOCK_SIZES``), and the
  budget is what the ``<size>`` file type spends on the same tensors (the output head
  included), so the file is no larger than llama-quantize's of that type;
- the KL divergence of the next-token distribution is measured with each layer alone at Q4_K
  (or its fallback; solved by the recipe's algorithm for GPTQ-class algorithms); its other
  types follow the second-order model ``KL ~ e_l(t)``, the layer's output error
  ``tr(dW H dW^T)`` (Frantar et al., 2022, eq. 1) after solving at each type. The head's
  types are each measured.

The head is quantized by rounding (every recipe's head is solved alone); a tied embedding
shares its codes, as in llama.cpp, so a tied head is scored with the embedding rounded too
(``_tied_head_kl``). The resolved recipe names every layer's type explicitly (and keeps the
name), so it reloads and re-quantizes as written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from torch import nn

from lowbit.model import gguf_mixes
from lowbit.model.gguf_grids import BLOCK_SIZES, fit_row_length, grid_of, grid_spec
from lowbit.model.mixed import SOLVED, _slice, allocate
from lowbit.model.mixed_scoring import Scorer, _kl, group_stats, layer_bits, solve_candidate
from lowbit.model.recipe import Recipe, RecipeError, Rule, Scheme, gguf_kind
from lowbit.model.targets import tied_embedding

#: the types a layer may get (before the row-length fallback)
CANDIDATES = ("q2_k", "q3_k", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
#: the head's types: rounded, so the calibrated algorithms' low-bit grids are left out
HEAD_CANDIDATES = ("q4_k", "q5_k", "q6_k", "q8_0")

__all__ = ["CANDIDATES", "HEAD_CANDIDATES", "gguf_auto_recipe", "recipe_from_types",
           "tensor_bits"]


def fitted_type(kind: str, width: int) -> str:
    """The type a tensor of rows of ``width`` inputs gets for ``kind`` (llama.cpp's fallback)."""
    return grid_of(fit_row_length(grid_spec(kind), width))


def tensor_bits(kind: str, weight_shape: tuple[int, int]) -> int:
    """Bits of a GGUF tensor of ``kind`` holding a ``(rows, width)`` weight."""
    rows, width = weight_shape
    values, nbytes = BLOCK_SIZES[kind]
    if width % values:
        raise RecipeError(f"rows of {width} inputs do not fill {kind.upper()}'s blocks of "
                          f"{values}")
    return 8 * nbytes * rows * (width // values)


def _layers(model: nn.Module, size: str) -> dict[str, str]:
    """Every linear the recipe quantizes -> the (fitted) type the ``size`` mix gives it."""
    out = {n: fitted_type(t, model.get_submodule(n).in_features)
           for n, t in gguf_mixes.layer_types(model, size).items()}
    head = getattr(model, gguf_mixes.HEAD, None)
    if isinstance(head, nn.Linear):
        out[gguf_mixes.HEAD] = fitted_type(gguf_mixes.output_type(size), head.in_features)
    return out


def _options(width: int, candidates) -> list[str]:
    """The distinct types rows of ``width`` inputs can take among ``candidates``."""
    return list(dict.fromkeys(fitted_type(c, width) for c in candidates))


@torch.no_grad()
def _solved(model, batches, base: Scheme, options: dict[str, list[str]],
            anchors: dict[str, str], progress: bool):
    """``{layer: {type: (err, W_hat or None)}}``: each block linear solved at each of its
    types against the float model's Hessian (``mixed.solved_errors``'s pass, per layer's
    options; plain GPTQ: refinement lowers every type's error alike). ``W_hat`` is kept at
    the anchor types only."""
    base = replace(base, options={**dict(base.options), "refine_passes": 0})
    names = [n for n in options if n != gguf_mixes.HEAD]
    groups = group_stats(model, batches, names)
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="solving types", unit="group", leave=False, disable=None)
    out: dict[str, dict] = {n: {} for n in names}
    for group, st in groups:
        for kind in options[group[0]]:
            keep = kind in {anchors[n] for n in group}
            scheme = replace(base, weight=grid_spec(kind))
            for n, res in solve_candidate(model, group, st, scheme, keep).items():
                out[n][kind] = res
    return out


def gguf_auto_recipe(model: nn.Module, recipe: Recipe, batches: list | None, *,
                     candidates=CANDIDATES, head_candidates=HEAD_CANDIDATES,
                     sensitivity_tokens: int = 256, solved_tokens: int = 8192,
                     progress: bool = True) -> Recipe:
    """Resolve a ``gguf:auto:<size>`` placeholder into one explicit type per layer (module
    docstring). The sensitivity table is kept on ``model.lowbit_sensitivity``."""
    size = gguf_kind(recipe)
    if not batches:
        raise RecipeError(f"{recipe.name} measures each layer's sensitivity on calibration "
                          f"data: pass calibration=lowbit.data.text('default', tokenizer)")
    base = recipe.default
    mix = _layers(model, size)
    options = {n: _options(model.get_submodule(n).in_features,
                           head_candidates if n == gguf_mixes.HEAD else candidates)
               for n in mix}
    for n, kind in mix.items():  # the mix's own type is always an option
        if kind not in options[n]:
            options[n].append(kind)
    anchors = {n: _anchor(opts, model.get_submodule(n).in_features)
               for n, opts in options.items()}
    solved = None
    if base.algorithm in SOLVED:
        solved = _solved(model, _slice(batches, solved_tokens), base, options, anchors,
                         progress)
    slice_ = _slice(batches, sensitivity_tokens)
    scorer = Scorer(model, slice_, list(mix))
    tied = tied_embedding(model) is not None
    sens = {}
    items = list(mix)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="sensitivity", unit="layer", leave=False, disable=None)
    for n in items:
        rtn = {k: Scheme(grid_spec(k)) for k in options[n]}
        own = None if solved is None or n not in solved else {
            "err": {k: e for k, (e, _) in solved[n].items()},
            "w_hat": {k: w for k, (_, w) in solved[n].items() if w is not None}}
        head = n == gguf_mixes.HEAD  # one large matrix: each of its types is measured
        kl_at = (set() if tied else set(rtn)) if head else {anchors[n]}
        entry = scorer.score(n, rtn, kl_at, own)
        if head and tied:  # its codes are the embedding's too
            entry["kl"] = _tied_head_kl(model, slice_, rtn)
        shape = tuple(model.get_submodule(n).weight.shape)
        entry["bits"] = {k: tensor_bits(k, shape) for k in options[n]}
        ref_kl, ref_err = entry["kl"][anchors[n]], max(entry["err"][anchors[n]], 1e-30)
        for k in options[n]:
            entry["kl"].setdefault(k, ref_kl * entry["err"][k] / ref_err)
        sens[n] = entry
    model.lowbit_sensitivity = sens
    numel = sum(e["numel"] for e in sens.values())
    budget = sum(sens[n]["bits"][mix[n]] for n in sens)
    choice = allocate(sens, budget / numel * (1 + 1e-12))
    return recipe_from_types(recipe, choice)


def _anchor(options: list[str], width: int) -> str:
    """The type a layer's KL is measured at: Q4_K (or its fallback), mid-way in the options.
    (At the mix's own type, an 8-bit tensor's KL is too small to measure on a short slice,
    and scaling the others from it misjudges them.)"""
    kind = fitted_type("q4_k", width)
    if kind in options:
        return kind
    return sorted(options, key=lambda k: BLOCK_SIZES[k][1] / BLOCK_SIZES[k][0])[
        len(options) // 2]


@torch.no_grad()
def _tied_head_kl(model: nn.Module, batches: list, schemes: dict[str, Scheme]) -> dict:
    """KL of the whole model's next-token distribution with the head of a tied model rounded
    to each type and the embedding made the same rounded matrix, as the GGUF file holds one
    tensor for both (``targets.tie_embedding_to_head``): the head's scorer sees only the
    output side, which undercounts by the error every block reads from the embedding."""
    head = getattr(model, gguf_mixes.HEAD)
    embed = tied_embedding(model)
    W, E = head.weight.data, embed.weight.data

    def logits() -> list[torch.Tensor]:
        return [(model(**b) if isinstance(b, dict) else model(b)).logits for b in batches]

    base, kl = [torch.log_softmax(x.float(), -1) for x in logits()], {}
    for kind, scheme in schemes.items():
        w_hat = layer_bits(W.float(), scheme)[1].to(W.dtype)
        head.weight.data, embed.weight.data = w_hat, w_hat.to(E.dtype)
        try:
            kl[kind] = sum(_kl(p, x) for p, x in zip(base, logits(), strict=True)) / len(base)
        finally:
            head.weight.data, embed.weight.data = W, E
    return kl


def recipe_from_types(recipe: Recipe, choice: dict[str, str]) -> Recipe:
    """``recipe`` with one exact rule per layer: its type, solved by the recipe's algorithm
    (the head by rounding); the most common type is the default scheme."""
    base = recipe.default
    default = replace(base, weight=grid_spec(Counter(choice.values()).most_common(1)[0][0]))
    rules = tuple(Rule(n, Scheme(grid_spec(k), algorithm="rtn") if n == gguf_mixes.HEAD
                       else replace(base, weight=grid_spec(k)))
                  for n, k in choice.items())
    return replace(recipe, default=default, rules=rules)
