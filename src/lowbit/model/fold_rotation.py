"""A rotation of the residual stream folded into the weights: the model stays a plain decoder.

QuaRot (Ashkboos et al., 2024, sec. 4.1, "R1") and SpinQuant (Liu et al., 2024) rotate the
hidden state ``h -> h Q`` with an orthogonal ``Q`` everywhere at once. RMSNorm commutes with
it once its weight ``g`` is folded into the linears that read the norm
(``RMS(h Q) = RMS(h)``), so the rotated model computes exactly what the original does:

- the token embedding ``E -> E Q`` (each token's vector rotated);
- every linear that reads a norm's output (q/k/v, gate/up, the head): ``W -> W diag(g) Q``,
  and the norm's weight becomes 1;
- every linear that writes into the residual (o_proj, down_proj): ``W -> Q^T W``, bias
  ``b -> b Q``;
- a head tied to the embedding is split (it becomes ``E diag(g) Q`` and the embedding
  ``E Q``), and ``config.tie_word_embeddings`` is cleared.

Unlike lowbit's online rotation (``WeightSpec.rotation``: the layer rotates its input at
run time), nothing is left to compute: every runtime that runs the architecture runs the
folded model, GGUF exports included. The weights' outliers are spread over the hidden
dimension, which is what makes them easier to quantize. ``Q`` is lowbit's Hadamard matrix
of the hidden size (``formats.rotation``); the fold is computed in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import has_hadamard, rotate
from lowbit.runtime.arch import UnsupportedModelError, resolve_decoder


class FoldError(LowbitError, ValueError):
    """The model's residual stream cannot be rotated; the message says why."""


def _rotate_inputs(linear: nn.Linear, gain: torch.Tensor | None) -> None:
    """``W -> W diag(g) Q``: the layer reads the rotated, unscaled hidden state."""
    w = linear.weight.detach().double()
    if gain is not None:
        w = w * gain.detach().double()
    linear.weight = nn.Parameter(rotate(w, "hadamard").to(linear.weight.dtype),
                                 requires_grad=False)


def _rotate_outputs(linear: nn.Linear) -> None:
    """``W -> Q^T W`` and ``b -> b Q``: the layer writes the rotated hidden state."""
    w = linear.weight.detach().double()
    rotated = rotate(w.T.contiguous(), "hadamard").T.contiguous()
    linear.weight = nn.Parameter(rotated.to(linear.weight.dtype), requires_grad=False)
    if linear.bias is not None:
        b = rotate(linear.bias.detach().double(), "hadamard")
        linear.bias = nn.Parameter(b.to(linear.bias.dtype), requires_grad=False)


def _unit(norm: nn.Module) -> torch.Tensor:
    """The norm's weight (returned) replaced by ones."""
    gain = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.fill_(1.0)
    return gain


@torch.no_grad()
def fold_residual_rotation(model: nn.Module) -> None:
    """Rotate ``model``'s residual stream in place (see the module docstring)."""
    try:
        spec = resolve_decoder(model)
    except UnsupportedModelError as exc:
        raise FoldError(f"a folded rotation needs a Llama-style decoder (RMSNorm pre-norm "
                        f"blocks): {exc}") from None
    if not has_hadamard(spec.hidden_size):
        raise FoldError(f"no Hadamard matrix of the hidden size {spec.hidden_size} (lowbit "
                        f"builds 12^a * 2^k): use the online rotation (-rot) instead")
    for name, module in model.named_modules():
        if type(module).__name__.endswith("LayerNorm") and hasattr(module, "bias") and \
                getattr(module, "bias", None) is not None:
            raise FoldError(f"{name} is a LayerNorm with a bias, which does not commute with "
                            f"a rotation: only RMSNorm models fold")
    embed, head = spec.embed, spec.lm_head
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False
    embed.weight = nn.Parameter(rotate(embed.weight.detach().double(), "hadamard")
                                .to(embed.weight.dtype), requires_grad=False)
    for layer in spec.layers:
        gain = _unit(layer.input_norm)
        for linear in (layer.q_proj, layer.k_proj, layer.v_proj):
            _rotate_inputs(linear, gain)
        _rotate_outputs(layer.o_proj)
        gain = _unit(layer.post_attention_norm)
        for linear in (layer.gate_proj, layer.up_proj):
            _rotate_inputs(linear, gain)
        _rotate_outputs(layer.down_proj)
    _rotate_inputs(head, _unit(spec.final_norm))
    model.lowbit_folded_rotation = "hadamard"
