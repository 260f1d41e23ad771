"""Synthetic Hugging Face checkpoints of any size, written one block at a time.

``write_checkpoint(folder, config)`` writes config.json and one safetensors shard per decoder
block (plus one for the rest) with an index, as ``save_pretrained`` shards a model, without
ever holding more than one block: the architecture comes from a ``meta``-device model, each
tensor from a generator seeded by its name, so a config with fewer layers gives the same
tensors for the blocks both have (a slice of the big model). Used by the streaming tests and
by ``benchmarks/stream_memory.py`` / ``benchmarks/stream_time.py``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch


def llama_config(hidden: int, inter: int, layers: int, vocab: int = 1024, heads: int = 8,
                 kv_heads: int | None = None, family: str = "llama", tie: bool = False):
    """A small Llama (or Qwen2: ``family="qwen2"``, with q/k/v biases) config."""
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
               tie_word_embeddings=tie, architectures=[
                   "Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"])


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * 0.02


def write_checkpoint(folder: Path, config) -> int:
    """Write ``config``'s model with random weights to ``folder``; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1:2] == ["layers"] else "rest"
        groups.setdefault(key, []).append(name)
    weight_map, total = {}, 0
    for i, (_, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _tensor(n, shapes[n]) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total
