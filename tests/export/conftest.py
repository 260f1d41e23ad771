"""Tiny models and their tokenizer for the export tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def tiny_decoder(kind: str = "llama", hidden: int = 64, seed: int = 0, tied: bool = True):
    """A random 2-layer Llama / Mistral / Qwen2 with the tiny tokenizer's 300 tokens."""
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    cfg = config_cls(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128, tie_word_embeddings=tied)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norms away from 1 and (Qwen2) biases away from 0: permutations show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.lowbit_spec = f"<tiny {kind}>"
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def dequantized_copy(model):
    """``model`` with every quantized linear replaced by a float32 ``nn.Linear`` holding the
    weight lowbit dequantizes (the weights lowbit's model stands for, computed in float32)."""
    import copy

    from torch import nn

    from lowbit.nn import QuantizedLinear

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize_weight(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, lin)
    return out.float()
