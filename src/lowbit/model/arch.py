"""Architecture knowledge as data: which modules form a block and which op feeds which linears.

Calibrated algorithms need a few facts about a model, and this module derives them (``LAYOUTS``)
from the family table shared with the runtime (``lowbit.runtime.families``: module paths,
declared once per family) instead of class-name checks:

1. the *blocks* (the repeated layers), so calibration can run one block at a time holding one
   block's activations (GPTQ's reference ``llama_sequential``: the inputs of block ``i`` are
   the outputs of the already quantized block ``i - 1``);
2. the *groups*: linears that read the same input (q/k/v; gate/up), in the order a forward
   pass reaches them, so a group is quantized before the group that follows it reads its
   input ("true sequential" in the GPTQ code);
3. each group's *feeder*: the op whose output is the group's input and can absorb a
   per-input-channel factor ``1/s``. AWQ (Lin et al., 2023, eq. 3) and SmoothQuant (Xiao et
   al., 2022, eq. 3) compute ``(W diag(s)) (diag(s)^-1 x)`` and fold ``diag(s)^-1`` into it:
   a norm whose output feeds only that group (pre-norm blocks), or a linear whose output
   reaches the group through ops that commute with a per-channel scale (``v_proj`` ->
   attention -> ``o_proj`` when their widths match, i.e. no grouped-query repetition;
   ``up_proj`` -> ``act(gate) * up`` -> ``down_proj``). Post-norm blocks (BERT) have no such
   norm: their LayerNorm output also feeds the residual, so those groups have no feeder;
4. in pre-norm families, the *residual branches* a block computes in turn,
   ``h = h + branch(norm(h))`` (attention, then MLP): calibration then reruns only the
   branch that holds a group, not the whole block up to it (``runner.py`` checks on
   block 0 that the branches compose to the block's own forward before relying on them).

``Layout.of`` derives 2-4 from a family's roles: q/k/v fed by the input norm, o fed by v,
gate/up fed by the post-attention norm, down fed by up when the MLP is gated.

``resolve_arch(model)`` matches the table structurally (module paths, never class names).
A model the table does not know falls back to the largest ``nn.ModuleList`` of identical
blocks holding linears: each linear is then its own group, in registration order, with no
feeder. With no such list it raises ``ArchitectureError`` naming what it looked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime import families
from lowbit.runtime.families import Family


class ArchitectureError(LowbitError, ValueError):
    """The model's blocks or feeders cannot be found; the message names what is missing."""


@dataclass(frozen=True)
class GroupSpec:
    """Linears (paths inside a block) that share one input, and the op that produces it."""

    linears: tuple[str, ...]
    feeder: str | None = None


@dataclass(frozen=True)
class ResidualSpec:
    """A pre-norm residual branch of a block, ``h = h + branch(norm(h))``; ``kwargs``: the
    branch takes the block's keyword arguments (attention: mask, positions)."""

    norm: str
    branch: str
    kwargs: bool = False


@dataclass(frozen=True)
class Layout:
    """One family: candidate paths of its block list, its groups, its final norm and head,
    and (pre-norm families) the residual branches a block computes, in order."""

    name: str
    blocks: tuple[str, ...]
    groups: tuple[GroupSpec, ...]
    final_norm: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    residuals: tuple[ResidualSpec, ...] = ()

    @classmethod
    def of(cls, family: Family) -> Layout:
        """``family``'s blocks, groups in forward order, feeders and (pre-norm) branches.

        ``down`` is fed by ``up`` only through a gated MLP: ``act(gate) * up`` commutes with a
        per-channel scale on ``up``, ``act(up)`` does not. Post-norm families have no norm
        feeders and no branches."""
        f = family
        mlp_in = (f.gate_proj, f.up_proj) if f.gate_proj else (f.up_proj,)
        groups = (GroupSpec((f.q_proj, f.k_proj, f.v_proj), f.input_norm),
                  GroupSpec((f.o_proj,), f.v_proj),
                  GroupSpec(mlp_in, f.post_attention_norm),
                  GroupSpec((f.down_proj,), f.up_proj if f.gate_proj else None))
        residuals = ((ResidualSpec(f.input_norm, f.attention, kwargs=True),
                      ResidualSpec(f.post_attention_norm, f.mlp)) if f.pre_norm else ())
        return cls(f.name, f.at_bases(f.layers), groups, f.at_bases(f.final_norm),
                   (f.lm_head,) if f.lm_head else (), residuals)


LLAMA = Layout.of(families.LLAMA)  # also Mistral, Qwen2, SmolLM2, ...
BERT = Layout.of(families.BERT)
LAYOUTS: tuple[Layout, ...] = tuple(Layout.of(f) for f in families.FAMILIES)


@dataclass
class Group:
    """A resolved group: absolute linear names and the feeder that can absorb ``1/s``."""

    linears: list[str]
    feeder: str | None = None
    feeder_kind: str | None = None  # "norm" | "linear" | None


def first_output(out):
    """The hidden states of a module's output (Hugging Face modules return tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Branch:
    """A resolved residual branch: its norm and module, and the groups inside it."""

    norm: nn.Module
    module: nn.Module
    kwargs: bool
    groups: list[Group]

    def __call__(self, h, kwargs: dict):
        out = self.module(self.norm(h), **kwargs) if self.kwargs else self.module(self.norm(h))
        return first_output(out)

    def on(self, block_copy: nn.Module, block: nn.Module) -> Branch:
        """The same branch in ``block_copy`` (a deep copy of ``block``)."""
        names = {id(m): n for n, m in block.named_modules()}
        return Branch(block_copy.get_submodule(names[id(self.norm)]),
                      block_copy.get_submodule(names[id(self.module)]), self.kwargs, self.groups)


@dataclass
class Block:
    name: str
    module: nn.Module
    groups: list[Group]
    #: the block as ``h + branch(norm(h))`` steps covering every group, or empty; calibration
    #: checks that they compose to the block's own forward before it uses them
    branches: list[Branch] = field(default_factory=list)


@dataclass
class Arch:
    """What ``resolve_arch`` found: blocks with their groups, the final norm and the head."""

    layout: str
    blocks: list[Block]
    final_norm: str | None = None
    head: str | None = None
    notes: list[str] = field(default_factory=list)

    def block_linears(self) -> set[str]:
        return {n for b in self.blocks for g in b.groups for n in g.linears}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_linear(m: nn.Module | None) -> bool:
    return m is not None and hasattr(m, "in_features") and hasattr(m, "out_features")


def _feeder_kind(feeder: nn.Module | None, widths: set[int]) -> str | None:
    """``norm`` / ``linear`` when ``feeder``'s output channels can absorb ``1/s``, else None."""
    if feeder is None or len(widths) != 1:
        return None
    (width,) = widths
    if _is_linear(feeder):
        return "linear" if feeder.out_features == width else None  # grouped-query: no
    weight = getattr(feeder, "weight", None)
    if isinstance(weight, nn.Parameter) and tuple(weight.shape) == (width,):
        return "norm"
    return None


def _resolve_layout(model: nn.Module, layout: Layout) -> tuple[Arch | None, str | None]:
    """The layout applied to ``model``, or (None, what is missing)."""
    path = next((p for p in layout.blocks if isinstance(_get(model, p), nn.ModuleList)), None)
    if path is None:
        return None, None
    blocks_list = _get(model, path)
    blocks = []
    for i, block in enumerate(blocks_list):
        prefix = f"{path}.{i}"
        missing = [n for g in layout.groups for n in g.linears if not _is_linear(_get(block, n))]
        if missing:
            return None, f"{prefix} has no {', '.join(missing)}"
        groups = []
        for spec in layout.groups:
            widths = {_get(block, n).in_features for n in spec.linears}
            feeder = None if spec.feeder is None else _get(block, spec.feeder)
            kind = _feeder_kind(feeder, widths)
            groups.append(Group([f"{prefix}.{n}" for n in spec.linears],
                                f"{prefix}.{spec.feeder}" if kind else None, kind))
        declared = {n for g in groups for n in g.linears}
        extra = [f"{prefix}.{n}" for n, m in block.named_modules() if n and _is_linear(m)
                 and f"{prefix}.{n}" not in declared and type(m) is nn.Linear]
        groups += [Group([n]) for n in extra]  # linears the table does not name: alone
        blocks.append(Block(prefix, block, groups, _branches(block, prefix, layout, groups)))
    final_norm = next((p for p in layout.final_norm if _get(model, p) is not None), None)
    head = next((p for p in layout.head if _is_linear(_get(model, p))), None)
    return Arch(layout.name, blocks, final_norm, head), None


def _branches(block: nn.Module, prefix: str, layout: Layout, groups: list[Group]) -> list[Branch]:
    """The layout's residual branches with their groups (by path), or [] when a branch is
    missing or a group lies outside every branch."""
    branches = []
    for spec in layout.residuals:
        norm, module = _get(block, spec.norm), _get(block, spec.branch)
        if norm is None or module is None:
            return []
        inside = [g for g in groups
                  if all(n.startswith(f"{prefix}.{spec.branch}.") for n in g.linears)]
        branches.append(Branch(norm, module, spec.kwargs, inside))
    if sum(len(b.groups) for b in branches) != len(groups):
        return []
    return branches


def _structural(model: nn.Module) -> Arch | None:
    """The largest ModuleList of same-type blocks that hold linears; one group per linear."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if not any(type(m) is nn.Linear for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        return None
    name, blocks_list = best
    blocks = []
    for i, block in enumerate(blocks_list):
        prefix = f"{name}.{i}"
        groups = [Group([f"{prefix}.{n}"]) for n, m in block.named_modules()
                  if n and type(m) is nn.Linear]
        blocks.append(Block(prefix, block, groups))
    return Arch("structural", blocks)


def resolve_arch(model: nn.Module, *, strict: bool = False) -> Arch:
    """Blocks, groups and feeders of ``model`` from ``LAYOUTS``, else the structural fallback.

    ``strict=True`` refuses the fallback (an error names what the table missed).
    """
    problems = []
    for layout in LAYOUTS:
        arch, missing = _resolve_layout(model, layout)
        if arch is not None:
            return arch
        if missing:
            problems.append(f"layout {layout.name!r}: {missing}")
    looked = ", ".join(p for lay in LAYOUTS for p in lay.blocks)
    if strict:
        raise ArchitectureError(
            f"{type(model).__name__} matches no known layout ({'; '.join(problems) or looked}); "
            f"add a Family to lowbit.runtime.families (lowbit.model.arch.LAYOUTS derives from "
            f"it) or pass strict=False")
    arch = _structural(model)
    if arch is None:
        raise ArchitectureError(
            f"cannot find the blocks of {type(model).__name__}: looked for {looked} and for any "
            f"nn.ModuleList of identical blocks holding nn.Linear layers; calibrated algorithms "
            f"run block by block, so add a Family to lowbit.runtime.families (lowbit.model.arch."
            f"LAYOUTS derives from it)")
    why = f" ({'; '.join(problems)})" if problems else ""
    arch.notes.append(
        f"architecture not in the table{why}: structural fallback on {arch.blocks[0].name[:-2]} "
        f"({len(arch.blocks)} blocks), one group per linear, no scale folding")
    return arch


def find_module(model: nn.Module, name: str | None) -> nn.Module | None:
    """``model.get_submodule(name)`` or None (None and "" give None)."""
    return _get(model, name) if name else None
