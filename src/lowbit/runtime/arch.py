"""The runtime's view of the family table: which decoders it can drive, and their modules.

A :class:`DecoderLayout` is derived from a :class:`~lowbit.runtime.families.Family` (the one
table, shared with calibration) for each family whose math the runtime implements (pre-norm
RMSNorm blocks, rotary attention with grouped KV heads, gated MLP). :func:`resolve_decoder`
reads the model's config and looks every module up by name; it never dispatches on class
names. Models outside the table get a :class:`UnsupportedModelError` that names what is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.runtime.families import FAMILIES, LLAMA, Family

__all__ = [
    "LLAMA_STYLE",
    "DecoderLayout",
    "DecoderSpec",
    "LayerModules",
    "UnsupportedModelError",
    "resolve_decoder",
]


class UnsupportedModelError(LowbitError, ValueError):
    """The model is not a Llama-style decoder the runtime knows how to run."""


@dataclass(frozen=True)
class DecoderLayout:
    """Module paths of a decoder family: model-level ones (``embed`` ... ``rotary``) from the
    model, the rest from one block. Built by :meth:`of`, never written by hand."""

    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    rotary: str
    attention: str
    input_norm: str
    post_attention_norm: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    gate_proj: str
    up_proj: str
    down_proj: str
    act_fn: str
    # submodules whose presence means extra math this runtime does not implement
    unsupported: tuple[str, ...]

    @classmethod
    def of(cls, family: Family) -> DecoderLayout:
        """``family`` as the runtime sees it: the base model at its first ``bases`` entry
        (the causal LM, whose ``lm_head`` the decode loop needs)."""
        paths = {f: getattr(family, f) for f in cls.__dataclass_fields__}
        for f in ("embed", "layers", "final_norm", "rotary"):
            paths[f] = family.at_bases(paths[f])[0]
        return cls(**paths)


# Sequences longer than a sliding window (Mistral, Qwen2) are refused by the runtime.
LLAMA_STYLE = DecoderLayout.of(LLAMA)
LAYOUTS: tuple[DecoderLayout, ...] = tuple(DecoderLayout.of(f) for f in FAMILIES if f.runtime)


@dataclass
class LayerModules:
    """The modules of one decoder block, in the order a forward pass calls them."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    post_attention_norm: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module


@dataclass
class DecoderSpec:
    """Everything the runtime needs, read from the config and the module table."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    act_fn: Any  # callable: F.silu for "silu", else the model's own mlp.act_fn
    intermediate_size: int
    attn_scale: float
    max_position_embeddings: int
    sliding_window: int | None  # sequences longer than this are refused (not implemented)
    embed: nn.Module
    layers: list[LayerModules]
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` (list indices allowed), or ``None``."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


def _check_config(config: Any) -> None:
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps"):
        if getattr(config, name, None) is None:
            raise UnsupportedModelError(f"config has no {name!r}: not a Llama-style decoder")


def resolve_decoder(model: nn.Module) -> DecoderSpec:
    """Read ``model``'s config and module table into a :class:`DecoderSpec`.

    Raises :class:`UnsupportedModelError` when ``config.model_type`` is not in a known
    layout's table, a required module is missing, or the model needs math the runtime lacks.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config: lowbit.runtime drives Hugging Face "
            "Llama-style causal LMs (model.layers[i].self_attn.q_proj ... lm_head)"
        )
    model_type = getattr(config, "model_type", None)
    layout = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
    if layout is None:
        known = sorted(t for lay in LAYOUTS for t in lay.model_types)
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a Llama-style decoder lowbit.runtime supports "
            f"(known: {', '.join(known)}); use the model's own generate() instead"
        )
    _check_config(config)

    def need(root: nn.Module, path: str, where: str) -> nn.Module:
        mod = _get(root, path)
        if mod is None:
            raise UnsupportedModelError(
                f"{where}{path} not found: the model does not have the Llama-style layout"
            )
        return mod

    blocks = need(model, layout.layers, "")
    layers = []
    for i, block in enumerate(blocks):
        where = f"{layout.layers}.{i}."
        for extra in layout.unsupported:
            if _get(block, extra) is not None:
                raise UnsupportedModelError(f"{where}{extra} exists: not implemented by runtime")
        fields = {f: need(block, getattr(layout, f), where) for f in LayerModules.__annotations__}
        layers.append(LayerModules(**fields))

    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} heads are not a multiple of {kv_heads} KV heads")
    attn = _get(blocks[0], layout.attention)
    scale = float(getattr(attn, "scaling", None) or head_dim**-0.5)
    act_name = str(getattr(config, "hidden_act", "silu"))
    act_fn = F.silu if act_name in ("silu", "swish") else need(blocks[0], layout.act_fn, "")
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return DecoderSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=_rope_theta(config),
        hidden_act=act_name,
        act_fn=act_fn,
        intermediate_size=intermediate,
        attn_scale=scale,
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)),
        sliding_window=_sliding_window(config),
        embed=need(model, layout.embed, ""),
        layers=layers,
        final_norm=need(model, layout.final_norm, ""),
        lm_head=need(model, layout.lm_head, ""),
        rotary=_get(model, layout.rotary),
    )


def rope_tables(spec: DecoderSpec, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``cos, sin`` tables of shape ``[length, head_dim]`` for positions ``0..length-1``.

    Uses the model's own rotary module when it has one (so scaled RoPE variants come out as
    the model computes them); otherwise the default RoPE from ``rope_theta``.
    """
    positions = torch.arange(length)
    if spec.rotary is not None:
        probe = torch.zeros(1, 1, spec.head_dim, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = spec.rotary(probe, positions[None])
        return cos[0].float(), sin[0].float()
    half = torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta**half)
    freqs = positions[:, None].float() * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
