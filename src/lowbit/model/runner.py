"""The block runner: calibrated quantization one block at a time (``pipeline.quantize_model``).

The loop follows the reference GPTQ code (``llama_sequential`` in IST-DASLab/gptq, Frantar et
al., 2022, section 5 "true sequential"), which holds one block's activations at a time:

1. run the model on the calibration batches until block 0 is called; keep block 0's input
   hidden states and keyword arguments (a hook raises to stop the forward there,
   ``block_inputs.py``);
2. for each block, for each group of linears that share an input (``arch.py``), in forward
   order: run the block (in pre-norm layouts only the residual branch that holds the group,
   ``arch.Branch``) on every stored input until the group's members have been called
   (earlier groups are already quantized, so each group sees the errors of those before it),
   accumulating the statistics its algorithms read (``algorithms.stats``); choose the
   group's input scale (AWQ, SmoothQuant) and fold ``1/s`` into the feeder (norm weight, or
   the rows of the linear before); solve every member (``algorithms.group``: each
   algorithm as registered); swap in the ``QuantizedLinear``;
3. run the quantized block on the stored inputs to get the next block's inputs, in place
   (held in float16, rows with huge entries over a power of two, see ``_hold``); with
   branches, ``h + branch(norm(h))`` after each branch's last group, so no group reruns the
   branches before it (SmolLM2-135M: about 2.0 instead of 2.8 block forwards of arithmetic
   per calibration token);
4. the head (``lm_head``) gets its statistics from ``final_norm(last hidden states)``.

Memory: the model, one hidden state per calibration token (``tokens x hidden x 2`` bytes),
one group's statistics (a Hessian is ``in x in``) and one block's intermediate activations.
Linears outside the blocks and the head are quantized without data (RTN for calibrated
algorithms; static activation scales there are refused with a hint).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.algorithms import InputStats
from lowbit.algorithms.group import (
    Member,
    Solution,
    group_scale,
    solve_group,
    static_input,
    stats_needed,
)
from lowbit.model.arch import Arch, Group, _feeder_kind, find_module, first_output
from lowbit.model.block_inputs import _capture, _check_members_share_inputs, _Stop
from lowbit.model.block_inputs import _check_enough as _check_enough  # re-exported
from lowbit.model.block_inputs import _token_count as _token_count  # re-exported
from lowbit.model.calib_memory import (
    TRIM_EVERY,
    _give_back_free_memory,
    _hold,
    _restore,
    solve_allocations,
)
from lowbit.model.targets import _set_module
from lowbit.nn import QuantizedLinear


class _Reference:
    """GPTAQ's float path through the current block: the float model's block inputs
    (``hidden``, as the quantized path holds its own), an untouched copy of the block taken
    before any of its groups was quantized, and the stage to run on it."""

    def __init__(self, hidden: list, block: nn.Module, prefix: str, stage):
        self.hidden, self.block, self.prefix = hidden, block, prefix
        self.stage = stage  # (h, kwargs) -> output

    def module(self, name: str) -> nn.Module:
        """The float copy of the linear ``name`` (an absolute path inside the block)."""
        return self.block.get_submodule(name[len(self.prefix) + 1:])


def build_layer(sol: Solution, backend: str | None = None, outliers=None) -> QuantizedLinear:
    """The packed module for a solution: codes and parameters, or a per-row codebook."""
    if sol.is_codebook:
        from lowbit.nn.codebook import packed_codebook

        packed = packed_codebook(sol.codes, sol.qparams, sol.spec)
        return QuantizedLinear(packed, sol.spec, sol.bias, backend=backend)
    return QuantizedLinear.from_codes(
        sol.codes, sol.qparams, sol.spec, sol.bias, activation=sol.scheme.activation,
        input_qparams=sol.input_qparams, backend=backend, outliers=outliers)


class _Run:
    """State of one calibrated ``quantize`` call."""

    def __init__(self, model, plan, backend, sample_tokens):
        self.model, self.plan, self.backend = model, plan, backend
        self.sample_tokens = sample_tokens
        #: GPTAQ's float path for the current stage, or None (``_Reference``)
        self.reference: _Reference | None = None
        self.solutions: dict[str, Solution] = {}
        self.info: dict[str, dict] = {}

    def members(self, group: Group) -> list[Member]:
        return [Member(n, self.model.get_submodule(n), self.plan[n]) for n in group.linears
                if n in self.plan and type(self.model.get_submodule(n)) is nn.Linear]

    def collect(self, run_stage, groups_members, hidden, kwargs_list) -> list[InputStats | None]:
        """One pass over the stored inputs. The first batch runs until every member has been
        called and checks that each group's members read one input (what ``arch`` claims);
        later batches stop at each group's first call (for q/k/v, before ``q_proj``'s
        product: SmolLM2-135M's block passes skip 18% of their linear arithmetic)."""
        names = [m.name for ms in groups_members for m in ms]
        needs = [set().union(*(stats_needed(m.scheme) for m in ms)) if ms else set()
                 for ms in groups_members]
        if not names or not any(needs):
            return [None] * len(groups_members)
        per_batch = -(-self.sample_tokens // max(1, len(hidden)))
        stats = [InputStats(ms[0].module.in_features, need, per_batch) if need else None
                 for ms, need in zip(groups_members, needs, strict=True)]
        owner = {m.name: i for i, ms in enumerate(groups_members) for m in ms}
        wanted = {owner[n] for n in names}
        seen: dict[str, torch.Tensor] = {}
        seen_float: dict[str, torch.Tensor] = {}
        first_batch = True  # records every member (the hooks read the current value)

        def hook(store, name):  # record the input; stop once the batch has what it needs
            def pre(module, args):
                store[name] = args[0]
                if (len(store) == len(names) if first_batch
                        else len({owner[n] for n in store}) == len(wanted)):
                    raise _Stop
            return pre

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(seen, n))
                   for n in names]
        ref = self.reference if any("cross" in need for need in needs) else None
        if ref is not None:  # the same pre-hooks on the float copy of the block
            handles += [ref.module(n).register_forward_pre_hook(hook(seen_float, n))
                        for n in names]
        try:
            for index, (h, kw) in enumerate(zip(hidden, kwargs_list, strict=True)):
                seen.clear()
                try:
                    run_stage(h, kw)
                except _Stop:
                    pass
                if ref is not None:
                    seen_float.clear()
                    try:
                        ref.stage(ref.hidden[index], kw)
                    except _Stop:
                        pass
                if first_batch:
                    _check_members_share_inputs(groups_members, seen)
                    first_batch = False
                first = {}  # group -> the input one of its members read
                for name in seen:
                    first.setdefault(owner[name], name)
                for i, name in first.items():
                    if stats[i] is not None:
                        stats[i].add(seen[name], seen_float.get(name))
        finally:
            for handle in handles:
                handle.remove()
            seen.clear()
            seen_float.clear()
        return stats

    def quantize_group(self, group: Group, members: list[Member], stats) -> None:
        if not members:
            return
        _give_back_free_memory()  # the forwards' activations, before the solve's buffers
        with solve_allocations():
            self._quantize_members(group, members, stats)
        _give_back_free_memory()

    def _quantize_members(self, group: Group, members: list[Member], stats) -> None:
        foldable = self.can_fold(group)
        s, found = group_scale(members, stats, foldable)
        if s is not None:
            self.fold(group, 1.0 / s)
        sols = solve_group(members, stats, s)
        if stats is not None:
            static_input(members, sols, stats, s)
        for m, sol in zip(members, sols, strict=True):
            sol.info.update(found)
            self.solutions[m.name] = sol
            self.info[m.name] = sol.info
            _set_module(self.model, m.name, build_layer(sol, self.backend))

    def can_fold(self, group: Group) -> bool:
        if group.feeder is None:
            return False
        if group.feeder in self.solutions:
            return self.solutions[group.feeder].can_scale_rows()
        return type(find_module(self.model, group.feeder)) is not QuantizedLinear

    @torch.no_grad()
    def fold(self, group: Group, r: torch.Tensor) -> None:
        """Multiply the feeder's output channels by ``r = 1/s`` (AWQ / SmoothQuant eq. 3)."""
        feeder = find_module(self.model, group.feeder)
        if group.feeder in self.solutions:  # already quantized: rescale its rows
            sol = self.solutions[group.feeder]
            sol.scale_rows(r)
            _set_module(self.model, group.feeder, build_layer(sol, self.backend))
            return
        weight = feeder.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(r.reshape(shape).to(weight.dtype))
        if getattr(feeder, "bias", None) is not None:
            feeder.bias.mul_(r.to(feeder.bias.dtype))

    def stage(self, groups: list[Group], run_stage, hidden, kwargs_list, sequential: bool):
        members = [self.members(g) for g in groups]
        if sequential:
            for g, ms in zip(groups, members, strict=True):
                (stats,) = self.collect(run_stage, [ms], hidden, kwargs_list)
                self.quantize_group(g, ms, stats)
        else:
            all_stats = self.collect(run_stage, members, hidden, kwargs_list)
            for g, ms, stats in zip(groups, members, all_stats, strict=True):
                self.quantize_group(g, ms, stats)


def _branches_compose(arch: Arch, hidden: list, kwargs_list: list, dtype) -> bool:
    """Whether every block has residual branches and, on block 0's first batch, they
    compose to the block's own forward (``h + b(norm(h))`` in turn; a block whose forward
    does anything else, e.g. a norm after a branch, runs whole)."""
    if not hidden or not all(b.branches for b in arch.blocks):
        return False
    block = arch.blocks[0]
    h, kw = _restore(hidden[0], dtype), kwargs_list[0]
    whole = first_output(block.module(h, **kw))
    for branch in block.branches:
        h = h + branch(h, kw)
    close = bool((whole - h).abs().amax() <= 1e-4 * whole.abs().amax().clamp_min(1e-30))
    if not close:
        arch.notes.append(f"{block.name}'s forward is not its residual branches in turn: "
                          f"calibration runs whole blocks")
    return close


def _steps(block, block_copy, split: bool) -> list:
    """(groups, step, the same step on the float copy, whether it is a residual branch)
    for each part of ``block`` that calibration runs on its own: its residual branches
    (``split``), else the whole block. A step is ``(h, kwargs) -> output``."""
    def whole(module):
        return lambda h, kw: first_output(module(h, **kw))

    if split:
        return [(b.groups, b, b.on(block_copy, block.module) if block_copy is not None
                 else None, True) for b in block.branches]
    return [(block.groups, whole(block.module),
             whole(block_copy) if block_copy is not None else None, False)]


def _capture_held(model: nn.Module, first_block: nn.Module, batches: list,
                  half_inputs: bool = True):
    """Step 1: block 0's inputs as calibration holds them, their keyword arguments, and the
    dtype the blocks compute in (``hidden`` may hold float16)."""
    dtypes: list[torch.dtype] = []

    def hold(h):
        dtypes.append(h.dtype)
        return _hold(h, half_inputs)

    hidden, kwargs_list = _capture(model, first_block, batches, hold)
    _give_back_free_memory()
    return hidden, kwargs_list, dtypes[0]


class _Walk:
    """Steps 2-4 of the module docstring, one block (or the head) per call: the stored
    inputs of the next block (``hidden``; GPTAQ's float path ``hidden_float`` too) live here
    between calls. ``split``: run residual branches on their own (``_branches_compose``)."""

    def __init__(self, run: _Run, hidden: list, kwargs_list: list, dtype, split: bool,
                 sequential: bool, half_inputs: bool = True, hidden_float: list | None = None):
        self.run, self.hidden, self.kwargs_list, self.dtype = run, hidden, kwargs_list, dtype
        self.split, self.sequential, self.half_inputs = split, sequential, half_inputs
        # GPTAQ: the float model's block inputs too, and a float copy of each block
        self.reference = any("cross" in stats_needed(s) for s in run.plan.values())
        if self.reference and hidden_float is None:
            hidden_float = list(hidden)  # entries are replaced, not edited
        self.hidden_float = hidden_float if self.reference else None

    def _on_held(self, step):  # the step on a stored input
        return lambda held, kwargs: step(_restore(held, self.dtype), kwargs)

    def block(self, block) -> set[str]:
        """Quantize ``block`` group by group and advance the stored inputs through it;
        returns the names of its linears."""
        run, reference = self.run, self.reference
        block_copy = copy.deepcopy(block.module) if reference else None
        for groups, step, float_step, residual in _steps(block, block_copy, self.split):
            if reference:
                run.reference = _Reference(self.hidden_float, block_copy, block.name,
                                           self._on_held(float_step))
            run.stage(groups, self._on_held(step), self.hidden, self.kwargs_list,
                      self.sequential)
            paths = [(self.hidden, step)] + ([(self.hidden_float, float_step)]
                                             if reference else [])
            for states, fn in paths:
                for i, (h, kw) in enumerate(zip(states, self.kwargs_list, strict=True)):
                    x = _restore(h, self.dtype)
                    y = fn(x, kw)
                    states[i] = _hold(x + y if residual else y, self.half_inputs)
                    if i % TRIM_EVERY == TRIM_EVERY - 1:  # the old inputs' freed pages
                        _give_back_free_memory()
            _give_back_free_memory()
        run.reference = None
        del block_copy
        run.solutions.clear()  # feeders live in the same block: drop the unpacked codes
        return {n for g in block.groups for n in g.linears}

    def head(self, arch: Arch) -> set[str]:
        """Step 4: the head, from ``final_norm(last hidden states)``, when the plan has it."""
        model, head = self.run.model, arch.head
        norm = find_module(model, arch.final_norm)
        if head not in self.run.plan or norm is None:
            return set()
        head_module = model.get_submodule(head)
        kind = _feeder_kind(norm, {head_module.in_features})
        group = Group([head], arch.final_norm if kind else None, kind)

        def run_head(h, kw):
            return model.get_submodule(head)(norm(_restore(h, self.dtype)))

        self.run.stage([group], run_head, self.hidden, self.kwargs_list, sequential=True)
        return {head}


def _run_blocks(run: _Run, arch: Arch, batches: list, sequential: bool, progress: bool,
                half_inputs: bool = True):
    """Steps 1-4 of the module docstring; returns the names it quantized."""
    hidden, kwargs_list, dtype = _capture_held(run.model, arch.blocks[0].module, batches,
                                               half_inputs)
    blocks = arch.blocks
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="calibrated quantization", unit="block", leave=False,
                      disable=None)
    split = _branches_compose(arch, hidden, kwargs_list, dtype)
    walk = _Walk(run, hidden, kwargs_list, dtype, split, sequential, half_inputs)
    done = set()
    for block in blocks:
        done |= walk.block(block)
    done |= walk.head(arch)
    hidden.clear()
    return done
