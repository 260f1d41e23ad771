"""The block runner's inputs (``runner.py``): block 0's input hidden states and keyword
arguments for every calibration batch (step 1: a hook stops the forward there), and the checks
on them: enough tokens for the covariances GPTQ / AWQ estimate, and one input for all the
linears of a group."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.group import stats_needed
from lowbit.model.calibration import _as_inputs
from lowbit.model.recipe import RecipeError, Scheme


class _Stop(Exception):
    """Raised by a hook once everything a pass needs has been seen."""


def _token_count(batch) -> int:
    args, kwargs = _as_inputs(batch)
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _check_enough(plan: dict[str, Scheme], model: nn.Module, tokens: int) -> None:
    """GPTQ / AWQ estimate an ``in x in`` covariance: refuse fewer tokens than inputs."""
    worst = None
    for name, scheme in plan.items():
        if "hessian" in stats_needed(scheme):
            width = model.get_submodule(name).in_features
            if tokens < width and (worst is None or width > worst[1]):
                worst = (name, width)
    if worst:
        raise RecipeError(
            f"too little calibration data: {worst[0]} ({'GPTQ/AWQ'}) estimates a {worst[1]}x"
            f"{worst[1]} input covariance but the calibration set has {tokens} tokens; pass at "
            f"least {worst[1]} (128 x 512 is usual), e.g. lowbit.data.text('default', tokenizer, "
            f"tokens=65536)")


def _capture(model: nn.Module, first_block: nn.Module, batches: list, hold=lambda h: h):
    """Block 0's input hidden states (each passed through ``hold`` as it arrives) and
    keyword arguments for every batch."""
    hidden, kwargs_list = [], []

    def pre(module, args, kwargs):
        raise _Stop(args[0] if args else kwargs.pop("hidden_states"), kwargs)

    handle = first_block.register_forward_pre_hook(pre, with_kwargs=True)
    use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") \
        else {}
    try:
        for batch in batches:
            args, kwargs = _as_inputs(batch)
            try:
                model(*args, **{**use_cache, **kwargs})
            except _Stop as stop:
                h, kw = stop.args
                hidden.append(hold(h.detach()))
                prev = kwargs_list[-1] if kwargs_list else None
                kwargs_list.append(prev if prev is not None and _same(prev, kw) else kw)
                continue
            raise RecipeError("the model's forward never reached its first block; "
                              "is the calibration data a batch of token ids?")
    finally:
        handle.remove()
    return hidden, kwargs_list


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or not all(_same({0: p}, {0: q})
                                           for p, q in zip(x, y, strict=True)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x is not y and x != y:
            return False
    return True


def _check_members_share_inputs(groups_members, seen: dict) -> None:
    missing = [m.name for ms in groups_members for m in ms if m.name not in seen]
    if missing:
        raise RecipeError(f"{', '.join(missing)} never ran in its block's forward, "
                          f"so no statistics can be collected; keep it in the recipe")
    for ms in groups_members:
        a = seen[ms[0].name]
        for m in ms[1:]:
            b = seen[m.name]
            if b is not a and not (b.shape == a.shape and torch.equal(b, a)):
                raise RecipeError(
                    f"{ms[0].name} and {m.name} are one group in the architecture table but "
                    f"read different inputs; give each its own GroupSpec in "
                    f"lowbit.model.arch.LAYOUTS (or pass arch= with the right groups)")
