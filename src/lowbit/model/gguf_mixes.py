"""llama-quantize's type mixes (``Q4_K_M``, ``Q3_K_M``, ``Q2_K``, ...) as lowbit recipes.

A llama.cpp file type is a choice of tensor type per tensor, not one type: ``Q4_K_M`` writes
most weights as Q4_K but ``attn_v`` and ``ffn_down`` of some layers as Q6_K, and the output
head as Q6_K. ``tensor_type`` follows ``llama_tensor_get_type_impl`` of llama.cpp's
``src/llama-quant.cpp`` for dense Llama-family models (the 70B and 8-expert special cases
aside, and without an importance matrix), so ``gguf:q4_k_m-gptq`` solves every layer on the
grid llama-quantize would give it. The fallback of a k-quant for rows that are not a multiple
of 256 is applied later, per layer, by ``gguf_grids.fit_row_length``.

``resolve_mix`` turns the placeholder ``gguf:<mix>`` recipe into explicit per-layer rules once
the model is known (the choice depends on the number of layers), as ``auto:`` recipes are
resolved; the resolved recipe is what a checkpoint records.
"""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from lowbit.model.gguf_grids import GGUF_GRIDS, grid_spec
from lowbit.model.scheme import Rule, Scheme

#: llama-quantize file type -> the type most tensors get (``llama_ftype_get_default_type``)
MIX_DEFAULT = {"q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
               "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k",
               "iq4_nl": "iq4_nl"}
#: lowbit module name suffix -> llama.cpp tensor category that the mixes treat specially
ROLES = {"self_attn.v_proj": "attn_v", "mlp.down_proj": "ffn_down",
         "self_attn.o_proj": "attn_output"}
HEAD = "lm_head"
#: what each mix changes from its main type (besides the head, Q6_K in every file type)
MIX_NOTES = {
    "q2_k": "attn_v Q3_K (Q4_K with >= 4 query heads per k/v head), attn_output and "
            "ffn_down Q3_K",
    "q3_k_s": "Q3_K everywhere",
    "q3_k_m": "attn_v Q5_K in layers 0-1 else Q4_K, ffn_down Q5_K in the first 1/16 else "
              "Q4_K, attn_output Q4_K",
    "q3_k_l": "attn_v, attn_output and ffn_down Q5_K",
    "q4_k_s": "attn_v Q5_K in layers 0-3, ffn_down Q5_K in the first 1/8",
    "q4_k_m": "attn_v and ffn_down Q6_K in the first and last 1/8 of the layers and every "
              "third between",
    "q5_k_s": "Q5_K everywhere",
    "q5_k_m": "attn_v and ffn_down Q6_K as in q4_k_m",
    "iq4_nl": "ffn_down Q5_K in the first 1/8 of the layers (without an importance matrix), "
              "attn_v Q5_K with >= 4 query heads per k/v head",
}
_LAYER = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third
    layer between them."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


def default_type(kind: str) -> str:
    """The type most tensors of ``gguf:<kind>`` get (``kind`` a mix or a single type)."""
    return MIX_DEFAULT.get(kind, kind)


def output_type(kind: str) -> str:
    """The output head's type: Q6_K (Q8_0 in a Q8_0 file); a tied embedding gets it too."""
    return "q8_0" if default_type(kind) == "q8_0" else "q6_k"


def tensor_type(kind: str, role: str | None, layer: int, layers: int, gqa: int = 1) -> str:
    """llama-quantize's type for a tensor of ``role`` (``attn_v``, ``ffn_down``,
    ``attn_output`` or None) in ``layer`` of ``layers``, in a ``gguf:<kind>`` file whose
    attention shares each k/v head among ``gqa`` query heads (before any row fallback)."""
    base = default_type(kind)
    if role == "attn_v":
        if kind == "q2_k":
            return "q4_k" if gqa >= 4 else "q3_k"
        if kind == "q3_k_m":
            return "q5_k" if layer < 2 else "q4_k"
        if kind == "q3_k_l":
            return "q5_k"
        if kind in ("q4_k_m", "q5_k_m") and more_bits(layer, layers):
            return "q6_k"
        if kind == "q4_k_s" and layer < 4:
            return "q5_k"
        if kind == "iq4_nl" and gqa >= 4:
            return "q5_k"
    elif role == "ffn_down":
        if kind == "q2_k":
            return "q3_k"
        if kind == "q3_k_m":
            return "q5_k" if layer < layers // 16 else "q4_k"
        if kind == "q3_k_l":
            return "q5_k"
        if kind in ("q4_k_m", "q5_k_m") and more_bits(layer, layers):
            return "q6_k"
        if kind in ("q4_k_s", "iq4_nl") and layer < layers // 8:
            return "q5_k"
    elif role == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(kind, base)
    return base


def is_mix(kind: str) -> bool:
    return kind in MIX_DEFAULT


def layer_types(model: nn.Module, kind: str) -> dict[str, str]:
    """Module name -> llama.cpp type, for every ``nn.Linear`` of ``model`` but the head
    (``head_rule``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    indices = [int(m.group(1)) for n in names if (m := _LAYER.fullmatch(n))]
    layers = max(indices) + 1 if indices else 1
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 1) or 1
    gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
    types = {}
    for name in names:
        if name.split(".")[-1] == HEAD:
            continue
        m = _LAYER.fullmatch(name)
        role = ROLES.get(m.group(2)) if m else None
        types[name] = tensor_type(kind, role, int(m.group(1)) if m else 0, layers, gqa)
    return types


def resolve_mix(model: nn.Module, recipe, kind: str):
    """``recipe`` (a placeholder ``gguf:<kind>`` recipe) with one rule per layer whose type is
    not the default, each solved by the recipe's algorithm and options (the head by rounding,
    as every recipe's head is solved alone)."""
    base = recipe.default
    default = default_type(kind)
    by_type: dict[str, list[str]] = {}
    for name, type_name in layer_types(model, kind).items():
        if type_name != default:
            by_type.setdefault(type_name, []).append(name)
    rules = []
    for type_name, names in sorted(by_type.items()):
        assert type_name in GGUF_GRIDS, type_name
        pattern = "re:" + "|".join(re.escape(n) for n in names)
        rules.append(Rule(pattern, replace(base, weight=grid_spec(type_name))))
    return replace(recipe, rules=tuple(rules) + head_rule(kind))


def head_rule(kind: str) -> tuple[Rule, ...]:
    """The output head's rule for a ``gguf:<kind>`` recipe: ``output_type``, rounded."""
    if output_type(kind) == default_type(kind):
        return ()
    return (Rule(HEAD, Scheme(grid_spec(output_type(kind)), algorithm="rtn"), optional=True),)
