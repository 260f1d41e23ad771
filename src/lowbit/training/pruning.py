"""Magnitude pruning, unstructured and N:M semi-structured, that composes with quantization.

- Unstructured (Han et al., 2015, "Learning both Weights and Connections"): zero the
  fraction ``sparsity`` of weights with the smallest ``|w|`` in each layer.
- N:M semi-structured (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks",
  NVIDIA's 2:4): in every group of ``M`` consecutive weights along the input axis keep the
  ``N`` largest magnitudes. For convolutions the axis is the flattened
  ``in_channels * kh * kw``.

Composition, prune -> quantize -> fine-tune: ``prune`` returns ``Masks``; ``Masks.apply``
zeroes the pruned weights again and ``Masks.hook`` zeroes their gradients, so a training
loop that calls ``apply`` after every optimizer step keeps the pattern while fake-quant
training adapts the rest. Zero is exact in every symmetric integer grid and in asymmetric
grids (the zero-point represents 0), so the converted model keeps the sparsity (binary
``{-1, +1}`` has no zero and cannot).

Bytes: dense storage does not shrink by pruning; ``sparse_nbytes`` estimates a sparse
layout (unstructured: a 1-bit occupancy map plus the kept values; N:M: the kept values plus
``ceil(log2 M)`` bits of index per kept value, as in the 2:4 metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.training.errors import TrainingError

PATTERNS = ("unstructured", "2:4", "n:m")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``1 - sparsity`` largest magnitudes of ``weight``."""
    if not 0.0 <= sparsity < 1.0:
        raise TrainingError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach().abs().reshape(-1).float()
    k = int(round(sparsity * w.numel()))
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold_idx = torch.topk(w, k, largest=False).indices
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    mask[threshold_idx] = False
    return mask.reshape(weight.shape)


def semi_structured_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes in every ``m`` consecutive weights of each row
    (rows: the output axis; a 4-D conv weight is viewed as ``[out, in * kh * kw]``)."""
    if not 0 < n < m:
        raise TrainingError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    w2 = weight.detach().abs().reshape(weight.shape[0], -1).float()
    k = w2.shape[1]
    if k % m:
        raise TrainingError(f"{n}:{m} sparsity needs the input size ({k}) to be a multiple "
                            f"of {m}; prune this layer unstructured or keep it dense")
    groups = w2.reshape(-1, m)
    keep = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(weight.shape)


@dataclass
class Masks:
    """Pruning masks by module name; ``apply`` re-zeroes, ``hook`` masks gradients."""

    masks: dict[str, torch.Tensor]
    pattern: str

    def apply(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                w = model.get_submodule(name).weight
                w.mul_(mask.to(w.device, w.dtype))

    def hook(self, model: nn.Module) -> list:
        """Register gradient hooks that zero pruned weights' gradients; returns handles."""
        handles = []
        for name, mask in self.masks.items():
            w = model.get_submodule(name).weight
            if w.requires_grad:
                handles.append(w.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
        return handles

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def prune(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured", *,
          n: int = 2, m: int = 4, skip: tuple[str, ...] = ()) -> Masks:
    """Prune every Linear / Conv2d weight (fake-quant ones included) in place.

    ``pattern``: ``unstructured`` (with ``sparsity``), ``2:4`` or ``n:m`` (with ``n``, ``m``).
    """
    if pattern not in PATTERNS:
        raise TrainingError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "2:4":
        n, m = 2, 4
    masks = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in skip:
            continue
        w = module.weight
        if pattern == "unstructured":
            mask = magnitude_mask(w, sparsity)
        else:
            mask = semi_structured_mask(w, n, m)
        masks[name] = mask
    if not masks:
        raise TrainingError(f"{type(model).__name__} has no Linear/Conv2d weights to prune")
    result = Masks(masks, pattern if pattern != "n:m" else f"{n}:{m}")
    result.apply(model)
    return result


def sparse_nbytes(mask: torch.Tensor, value_bits: float, pattern: str) -> float:
    """Estimated bytes of a sparse layout holding the kept values of one weight."""
    kept = int(mask.sum())
    if pattern == "unstructured":
        return (mask.numel() + kept * value_bits) / 8
    m = int(pattern.split(":")[1])
    return kept * (value_bits + math.ceil(math.log2(m))) / 8
