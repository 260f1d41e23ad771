"""The one table of model families lowbit knows: module paths, declared once per family.

Two views are derived from it, so a path is never written twice:

- :mod:`lowbit.runtime.arch` (``DecoderLayout``): the modules the runtime's decode loop
  calls, for the families whose math it implements (``runtime=True``);
- :mod:`lowbit.model.arch` (``Layout``): the blocks, groups of linears sharing an input,
  their feeders and residual branches that calibrated quantization walks.

Paths are dotted names as ``nn.Module.get_submodule`` takes them. Block-level paths
(``embed``, ``layers``, ``final_norm``, ``rotary``) are relative to the *base* model, which
sits at one of ``bases`` in a checkpoint ("" is the model itself: ``LlamaModel`` rather
than ``LlamaForCausalLM``); the rest are relative to one block, except ``lm_head`` (relative
to the model). Families are matched structurally (by these paths) for calibration and by
``config.model_type`` for the runtime; neither dispatches on class names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BERT", "FAMILIES", "LLAMA", "Family"]


@dataclass(frozen=True)
class Family:
    """A family's module paths. The attention linears and the MLP are named by role so both
    views can derive what they need: q/k/v read one input, o reads v through attention,
    ``down`` reads ``up`` (through ``act(gate) * up`` when the MLP is gated)."""

    name: str
    model_types: tuple[str, ...]
    bases: tuple[str, ...]  # where the base model sits; the runtime drives the first
    layers: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    up_proj: str
    down_proj: str
    gate_proj: str | None = None  # gated MLP: ``act(gate) * up`` commutes with a scale on up
    # pre-norm blocks, ``h + attn(input_norm(h))`` then ``h + mlp(post_attention_norm(h))``;
    # None for post-norm blocks, whose norm output also feeds the residual
    input_norm: str | None = None
    post_attention_norm: str | None = None
    embed: str | None = None
    final_norm: str | None = None
    rotary: str | None = None
    lm_head: str | None = None
    act_fn: str | None = None
    # submodules whose presence means extra math the runtime does not implement
    unsupported: tuple[str, ...] = ()
    runtime: bool = False  # the runtime's decode loop implements this family's math

    def at_bases(self, path: str | None) -> tuple[str, ...]:
        """``path`` (relative to the base model) under each of ``bases``, in order."""
        if path is None:
            return ()
        return tuple(f"{base}.{path}" if base else path for base in self.bases)

    @property
    def attention(self) -> str:
        """The attention module (the parent of ``q_proj``)."""
        return self.q_proj.rpartition(".")[0]

    @property
    def mlp(self) -> str:
        """The MLP module (the parent of ``down_proj``)."""
        return self.down_proj.rpartition(".")[0]

    @property
    def pre_norm(self) -> bool:
        return self.input_norm is not None and self.post_attention_norm is not None


# Llama, Mistral and Qwen2 (and SmolLM2, model_type "llama") share the layout and the math:
# pre-norm RMSNorm blocks, rotary attention with grouped KV heads, gated MLP. Qwen2's q/k/v
# biases live inside the Linear modules, so they need nothing here.
LLAMA = Family(
    "llama",
    model_types=("llama", "mistral", "qwen2"),
    bases=("model", ""),
    layers="layers",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    gate_proj="mlp.gate_proj",
    up_proj="mlp.up_proj",
    down_proj="mlp.down_proj",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    embed="embed_tokens",
    final_norm="norm",
    rotary="rotary_emb",
    lm_head="lm_head",
    act_fn="mlp.act_fn",
    unsupported=("self_attn.q_norm", "self_attn.k_norm"),  # Qwen3-style QK norms
    runtime=True,
)
# Post-norm encoder (BERT, RoBERTa): calibration only.
BERT = Family(
    "bert",
    model_types=("bert", "roberta"),
    bases=("", "bert", "roberta"),
    layers="encoder.layer",
    q_proj="attention.self.query",
    k_proj="attention.self.key",
    v_proj="attention.self.value",
    o_proj="attention.output.dense",
    up_proj="intermediate.dense",
    down_proj="output.dense",
)
FAMILIES: tuple[Family, ...] = (LLAMA, BERT)
