"""Read a GGUF export back and compare every weight with the one lowbit's model applies.

``compare_weights`` dequantizes each tensor's bytes with ``gguf.quants`` (llama.cpp's block
arithmetic in numpy, independent of lowbit's packing) and measures the largest difference
from lowbit's own dequantized weight, per GGUF type. The only rounding an export of lowbit's
codes adds is float16 storage of the block's ``d`` (and ``m``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from torch import nn

from lowbit.export import gguf_model
from lowbit.export.gguf_weights import ExportError, lowbit_weight


@dataclass
class TypeDiff:
    """Largest differences over the tensors of one GGUF type."""

    tensors: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # |diff| / the largest |value| of its row (float16: <= 2^-11)

    def add(self, diff: np.ndarray, ref: np.ndarray) -> None:
        self.tensors += 1
        self.max_abs = max(self.max_abs, float(diff.max(initial=0)))
        if diff.ndim == 1:
            diff, ref = diff[None], ref[None]
        top = np.abs(ref).max(axis=1)
        rows = diff.max(axis=1)
        nz = top > 0
        if nz.any():
            self.max_rel = max(self.max_rel, float((rows[nz] / top[nz]).max()))


def read_tensors(path: str | os.PathLike) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type, float32 values ``[rows, cols]``) of every tensor in a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ExportError(f"{path} is not a readable GGUF file ({exc})") from exc
    out = {}
    for t in reader.tensors:
        cols = int(t.shape[0])
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type.name.lower(), values.reshape(-1, cols))
    return out


def compare_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, TypeDiff]:
    """GGUF type -> largest difference between the file's weights and ``model``'s."""
    arch, config = gguf_model.architecture(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    stored = read_tensors(path)
    # a tied export's token_embd holds the quantized head (``gguf_model.shares_head``)
    shared = "output.weight" not in stored and gguf_model.shares_head(model)
    diffs: dict[str, TypeDiff] = {}
    for module_name, module in model.named_modules():
        base = gguf_model._map(module_name)
        if base is None or f"{base}.weight" not in stored:
            continue
        kind, values = stored[f"{base}.weight"]
        if shared and module_name == "model.embed_tokens":
            module = model.lm_head
        ref = lowbit_weight(module).numpy().reshape(values.shape)
        if arch == "llama" and module_name.endswith(("q_proj", "k_proj")):
            ref = gguf_model._permute_rows(ref, heads if module_name.endswith("q_proj")
                                           else kv_heads)
        diffs.setdefault(kind, TypeDiff()).add(np.abs(values - ref), ref)
    return diffs
