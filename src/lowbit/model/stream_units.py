"""The units a streamed quantization reads, quantizes and writes one at a time.

A unit is a set of submodules whose weights are read together: each decoder block (its
whole subtree), then the head with the final norm, then every other tensor's own module
(the embedding, ...). A ``gguf:`` recipe on a model that ties its embedding to its head
makes the embedding the dequantized head (``targets.tie_embedding_to_head``), so there the
head and the rest are one unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.model.arch import Arch, Block
from lowbit.model.lazy_model import LazyModel
from lowbit.model.summary import _tensor_bytes


@dataclass
class Unit:
    """``paths`` (their whole subtree when ``whole``, else each module's own tensors)."""

    name: str
    kind: str  # "block" | "head" | "rest"
    paths: list[str]
    whole: bool
    block: Block | None = None

    def holds(self, name: str) -> bool:
        """Whether module ``name`` (a linear) belongs to this unit."""
        return any(name == p or (self.whole and name.startswith(f"{p}.")) for p in self.paths)


def outside_paths(lazy: LazyModel, arch: Arch) -> list[str]:
    """Modules outside the blocks, the head and the final norm that own tensors."""
    blocks = tuple(f"{b.name}." for b in arch.blocks)
    head = {p for p in (arch.head, arch.final_norm) if p}
    owners: list[str] = []
    for key in lazy.model.state_dict():
        owner = key.rpartition(".")[0]
        if not key.startswith(blocks) and owner not in head and owner not in owners:
            owners.append(owner)
    return owners


def plan_units(lazy: LazyModel, arch: Arch, tie: bool) -> list[Unit]:
    """The blocks in order, then the head with the final norm, then the rest (module
    docstring); ``tie``: the head and the rest as one unit."""
    units = [Unit(b.name, "block", [b.name], True, b) for b in arch.blocks]
    head = [p for p in (arch.head, arch.final_norm) if p]
    rest = outside_paths(lazy, arch)
    if tie:
        return units + [Unit(" + ".join(head + rest), "head", head + rest, False)]
    if head:
        units.append(Unit(" + ".join(head), "head", head, False))
    if rest:
        units.append(Unit(" + ".join(rest), "rest", rest, False))
    return units


def unit_tensors(lazy: LazyModel, unit: Unit, plan: dict, entries_of) -> tuple[dict, dict]:
    """What ``unit`` writes (its quantized layers' codes, its float tensors) and its record:
    its part of the manifest (``quantized``, ``aliases``, ``dtypes``) and of the summary. A
    float tensor tied to one another unit writes (``lm_head`` kept in float) is an alias."""
    model = lazy.model
    tensors, quantized, aliases = {}, {}, {}
    for path in unit.paths:
        module = model.get_submodule(path)
        for name, entry in entries_of(module).items():
            if unit.whole or not name:
                quantized[f"{path}.{name}" if name else path] = entry
        for key, t in module.state_dict().items():
            if not unit.whole and "." in key:
                continue
            full = f"{path}.{key}"
            if full not in quantized and full in lazy.tied and path not in quantized:
                aliases[full] = lazy.tied[full]
                continue
            tensors[full] = t
    layers, after, kernels = 0, 0, {}
    for name in plan:
        if unit.holds(name):
            q = model.get_submodule(name)
            layers += 1
            after += q.weight_nbytes() + _tensor_bytes(q.bias)
            kernels[q.kernel] = kernels.get(q.kernel, 0) + 1
    record = {"quantized": quantized, "aliases": aliases,
              "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
              "summary": {"layers": layers, "bytes_after": after, "kernels": kernels}}
    return tensors, record


def check_memory(lazy: LazyModel, units: list[Unit], plan: dict, cap: int, tokens: int,
                 batch_tokens: int) -> int:
    """Refuse ``cap`` when one unit needs more (``stream_memory``); returns the need."""
    from lowbit.algorithms.group import stats_needed
    from lowbit.model.stream_memory import (
        check_cap,
        forward_bytes,
        held_inputs_bytes,
        resident_bytes,
        streaming_need,
    )

    model = lazy.model
    sizes = [(lazy.float32_bytes(u.paths, u.whole), u.name) for u in units]
    largest, name = max(sizes)
    float_copy = any("cross" in stats_needed(s) for s in plan.values())
    hidden = getattr(model.config, "hidden_size", 0) or 0
    held = held_inputs_bytes(tokens, hidden, float_copy)
    widest = max((m.out_features for n, m in model.named_modules()
                  if units[0].holds(n) and hasattr(m, "out_features")), default=hidden)
    forward = forward_bytes(batch_tokens, widest) if tokens else 0
    base = resident_bytes()
    need = streaming_need(base, largest, held, forward, float_copy)
    check_cap(cap, need, name, {
        "this process now": base, "its weights in float32": largest,
        "solver and packed copies": need - base - largest - held - forward,
        "calibration inputs": held, "one forward's activations": forward})
    return need
