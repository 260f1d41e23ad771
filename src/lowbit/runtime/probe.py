"""One synthetic decoder block on :class:`DecoderRuntime`, for ``kernels.autotune``'s choice
of the runtime's activation dtype: a float32 step (the fused C operations where lowbit's
native library is available) against a bf16 step of torch operations.

The block has SmolLM2-135M's widths (hidden 576, 9 heads, 3 KV heads, MLP 1536) and float
linears built from plain torch modules (no ``transformers``), so it costs milliseconds to
build; what it measures is the real runtime's decode step.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lowbit.kernels import native
from lowbit.runtime.decoder import DecoderRuntime

__all__ = ["BLOCK_SHAPES", "synthetic_decoder", "step_candidates"]

HIDDEN, HEADS, KV_HEADS, MLP = 576, 9, 3, 1536
#: ``(K, N)`` pairs whose GEMVs add up to one block's linears: q+k+v+o+gate+up+down hold
#: 576 x 6144 weights, twice 576 x 1536 plus twice 1536 x 576
BLOCK_SHAPES = ((HIDDEN, MLP), (MLP, HIDDEN))


def synthetic_decoder(layers: int = 1, vocab: int = 64, seed: int = 0) -> nn.Module:
    """A Llama-layout model that ``resolve_decoder`` accepts, random float32 weights."""
    torch.manual_seed(seed)
    dim = HIDDEN // HEADS
    root = nn.Module()
    root.config = SimpleNamespace(
        model_type="llama", hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_hidden_layers=layers, rms_norm_eps=1e-5,
        hidden_act="silu", intermediate_size=MLP, max_position_embeddings=256,
        rope_theta=10000.0)
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(vocab, HIDDEN)
    blocks = []
    for _ in range(layers):
        block = nn.Module()
        block.input_layernorm = nn.RMSNorm(HIDDEN, eps=1e-5)
        block.post_attention_layernorm = nn.RMSNorm(HIDDEN, eps=1e-5)
        block.self_attn = nn.Module()
        for name, out in (("q_proj", HEADS * dim), ("k_proj", KV_HEADS * dim),
                          ("v_proj", KV_HEADS * dim), ("o_proj", HIDDEN)):
            setattr(block.self_attn, name, nn.Linear(HIDDEN, out, bias=False))
        block.mlp = nn.Module()
        block.mlp.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
        block.mlp.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
        block.mlp.down_proj = nn.Linear(MLP, HIDDEN, bias=False)
        blocks.append(block)
    root.model.layers = nn.ModuleList(blocks)
    root.model.norm = nn.RMSNorm(HIDDEN, eps=1e-5)
    root.lm_head = nn.Linear(HIDDEN, vocab, bias=False)
    return root.eval()


def step_candidates(prompt: int = 16) -> dict:
    """``{"fp32": f, "bf16": f}``: ``f(n)`` runs ``n`` decode steps of the synthetic block
    at position ``prompt`` (the cache rewound each time) on a runtime of that dtype."""
    model = synthetic_decoder()
    ids = torch.arange(prompt).unsqueeze(0)
    token = torch.zeros(1, 1, dtype=torch.long)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        fused = dtype is torch.float32 and native.available()
        rt = DecoderRuntime(model, dtype=dtype, native=fused)
        rt.prefill(ids, max_len=prompt + 8)

        def steps(n: int, rt=rt) -> None:
            for _ in range(n):
                rt.length = prompt
                rt.decode(token)

        out[name] = steps
    return out
