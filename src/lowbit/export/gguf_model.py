"""A Hugging Face decoder (Llama, Mistral, Qwen2) as GGUF hyper-parameters and named tensors.

Tensor names come from ``gguf``'s own tables (``TENSOR_NAMES``). For llama.cpp's ``llama``
architecture the rows of q and k are permuted the way its converter permutes them (rotary
pairs interleaved); the permutation moves whole rows, so it applies to packed blocks as well
as to float weights. With tied embeddings only ``token_embd`` is written and llama.cpp reuses
it as the output head, as llama-quantize writes such models: it holds the quantized head's
codes when the head is quantized (``share_head``), else the embedding in ``embedding_type``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch import nn

from lowbit.export import gguf_weights as weights
from lowbit.export.gguf_weights import ExportError
from lowbit.nn import QuantizedLinear

#: Hugging Face ``model_type`` -> llama.cpp architecture (Mistral runs as ``llama``)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: per-layer Hugging Face module -> gguf MODEL_TENSOR member
LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM", "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}
TOP_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM",
               "lm_head": "OUTPUT"}


@dataclass
class Tensor:
    """One GGUF tensor: ``data`` (float array, or uint8 blocks ``[rows, bytes]``) of ``type``;
    ``source``: the lowbit module it came from; ``carried``: lowbit's codes moved unchanged."""

    name: str
    type: str
    data: np.ndarray
    source: str
    carried: bool = False


def architecture(model: nn.Module) -> tuple[str, object]:
    """(llama.cpp architecture, HF config) of ``model``, or ``ExportError``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports the {', '.join(sorted(ARCHITECTURES))} architectures "
            f"(Hugging Face model_type); this model is {model_type or type(model).__name__}: "
            "convert it with llama.cpp's convert_hf_to_gguf.py instead")
    rope = getattr(config, "rope_scaling", None)
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ExportError(f"rope scaling {rope} is not exported yet; export a model without "
                          "rope scaling or convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type], config


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hparams(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, rows (0, half, 1, half+1, ...)."""
    rows = data.shape[0]
    rest = data.shape[1:]
    return np.ascontiguousarray(
        data.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest))


def _gguf_name(member: str, layer: int | None = None) -> str:
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    name = TENSOR_NAMES[MODEL_TENSOR[member]]
    return name.format(bid=layer) if layer is not None else name


def _map(module_name: str) -> str | None:
    if module_name in TOP_TENSORS:
        return _gguf_name(TOP_TENSORS[module_name])
    parts = module_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return _gguf_name(LAYER_TENSORS[parts[3]], int(parts[2]))
    return None


def _tied_head(model: nn.Module) -> bool:
    head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    return (type(head) is nn.Linear and embed is not None
            and head.weight.data_ptr() == embed.weight.data_ptr())


def shares_head(model: nn.Module) -> bool:
    """Whether ``token_embd`` may carry the quantized head's codes: the model ties its
    embedding to its head (``config.tie_word_embeddings``) and the head is quantized."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if not (getattr(config, "tie_word_embeddings", False) and isinstance(head, QuantizedLinear)):
        return False
    try:  # a head with no GGUF type is refused in its own place, after the blocks
        weights.block_type_of("lm_head", head)
    except ExportError:
        return False
    return True


def tensors(model: nn.Module, arch: str, config, float_type: str, embedding_type: str,
            share_head: bool = False) -> Iterator[Tensor]:
    """Every tensor of the GGUF file, in order; refuses parameters it cannot place.
    ``share_head``: ``token_embd`` holds the quantized head's codes and no output is written."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    placed: set[str] = set()
    skip_head = share_head or _tied_head(model)
    for module_name, module in model.named_modules():
        base = _map(module_name)
        if base is None:
            continue
        placed.update(f"{module_name}.{k}" for k in module.state_dict())
        if module_name == "lm_head" and skip_head:
            continue
        if module_name == "model.embed_tokens" and share_head:
            type_name, data = weights.carry_codes("lm_head", model.lm_head)
            yield Tensor(f"{base}.weight", type_name, data, "lm_head", True)
            continue
        if isinstance(module, QuantizedLinear):
            type_name, data = weights.carry_codes(module_name, module)
            carried = True
        elif base.endswith("_norm"):
            type_name, data, carried = "f32", module.weight.detach().float().numpy(), False
        else:
            chosen = embedding_type if module_name == "model.embed_tokens" else float_type
            type_name, data = weights.float_weight(module_name, module.weight, chosen)
            carried = False
        if arch == "llama" and module_name.endswith(("q_proj", "k_proj")):
            data = _permute_rows(data, heads if module_name.endswith("q_proj") else kv_heads)
        yield Tensor(f"{base}.weight", type_name, data, module_name, carried)
        bias = getattr(module, "bias", None)
        if bias is not None and not base.endswith("_norm"):
            b = bias.detach().float().numpy()
            if arch == "llama" and module_name.endswith(("q_proj", "k_proj")):
                b = _permute_rows(b, heads if module_name.endswith("q_proj") else kv_heads)
            yield Tensor(f"{base}.bias", "f32", np.ascontiguousarray(b), module_name)
    left = [k for k in model.state_dict() if k not in placed and "rotary_emb" not in k]
    if left:
        raise ExportError(f"{len(left)} tensors have no place in a {arch} GGUF file (e.g. "
                          f"{left[:3]}); this variant of the architecture is not exported yet")
