"""The training loop for QAT and fine-tuning: progress, resumable checkpoints, NaN stops.

``train(model, data, loss_fn, steps=...)`` runs ``steps`` optimizer steps, batch ``i``
being ``data[i % len(data)]`` (or ``data(i)``), so a resumed run sees the same batches as
an uninterrupted one. A checkpoint folder holds (never pickle):

- ``model.safetensors``: the model's tensors (shared ones once), fake-quant scales and
  observer ranges included;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors and the RNG state;
- ``state.json``: step, loss history, the optimizer's hyper-parameters, the loss scaler, and
  ``meta`` (the recipe, the QAT config: what a resumed run must match).

Checkpoints are written to a temporary folder and renamed into place, so the folder always
holds the last complete, good checkpoint. A non-finite loss stops training before its
backward pass with a ``TrainingError`` naming that checkpoint; resuming with ``meta`` that
differs from the checkpoint's (another recipe) is a ``TrainingError`` too.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.model.serialization import swap_in
from lowbit.training.errors import TrainingError
from lowbit.training.mixed_precision import MixedPrecision

STATE, MODEL, OPTIMIZER = "state.json", "model.safetensors", "optimizer.safetensors"
LOOP_VERSION = 1
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    skipped_steps: int = 0
    checkpoint: Path | None = None
    resumed_from: int = 0

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


# -- checkpoints -------------------------------------------------------------------------
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer, step: int,
                    losses: list[float], meta: dict, precision: MixedPrecision | None = None
                    ) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file, save_model

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_model(model, str(tmp / MODEL))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / OPTIMIZER))
        state = {"loop_version": LOOP_VERSION, "step": step, "losses": losses, "meta": meta,
                 "optimizer": opt_meta,
                 "precision": None if precision is None else precision.state_dict()}
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_checkpoint_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE
    if not path.is_file():
        raise TrainingError(f"{directory} holds no training checkpoint (no {STATE}); start "
                            f"without --resume, or point it at the folder a run wrote")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{path} is corrupt ({exc}); start a new run") from exc


def check_meta(saved: dict, wanted: dict, directory: str | Path) -> None:
    """Refuse to resume when the run's ``meta`` (recipe, QAT config...) differs."""
    keys = sorted(set(saved) | set(wanted))
    diff = [k for k in keys if json.dumps(saved.get(k), sort_keys=True, default=str)
            != json.dumps(wanted.get(k), sort_keys=True, default=str)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {_short(saved.get(k))} vs this run "
                           f"{_short(wanted.get(k))}" for k in diff)
        raise TrainingError(f"cannot resume from {directory}: it was written for a different "
                            f"run ({detail}). Resume with the same settings, or start a new "
                            f"run in another folder")


def _short(value) -> str:
    if isinstance(value, dict) and "name" in value:
        return repr(value["name"]) if len(json.dumps(value, default=str)) > 60 else repr(value)
    text = json.dumps(value, default=str)
    return text if len(text) < 60 else text[:57] + "..."


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer,
                    meta: dict | None = None, precision: MixedPrecision | None = None) -> dict:
    """Restore model, optimizer, RNG and loss scaler; returns the saved state (``step``...)."""
    from safetensors.torch import load_file, load_model

    state = read_checkpoint_state(directory)
    if meta is not None:
        check_meta(state.get("meta", {}), meta, directory)
    missing, unexpected = load_model(model, str(Path(directory) / MODEL), strict=False)
    if missing or unexpected:
        raise TrainingError(f"{directory} does not match this model (missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tensors = load_file(str(Path(directory) / OPTIMIZER))
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    if precision is not None and state.get("precision"):
        precision.load_state_dict(state["precision"])
    return state


def qat_optimizer(model: nn.Module, lr: float, scale_lr: float | None = None
                  ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with its own learning rate (``scale_lr``,
    default ``lr``) for the fake-quant scales and offsets, which are orders of magnitude
    smaller than weights and need larger steps."""
    from lowbit.nn.fake_quant import FakeQuantizer

    quant = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer)
             for p in m.parameters(recurse=False)}
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    if not params:
        raise TrainingError("no parameter requires a gradient: nothing to train")
    groups = [{"params": [p for p in params if id(p) not in quant], "lr": lr},
              {"params": [p for p in params if id(p) in quant], "lr": scale_lr or lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)


# -- the loop ----------------------------------------------------------------------------
def _batch(data, step: int):
    if callable(data):
        return data(step)
    if len(data) == 0:
        raise TrainingError("the training data is empty: pass at least one batch")
    return data[step % len(data)]


def _stop(what: str, step: int, last_good, checkpoint_dir) -> TrainingError:
    where = (f"the last good checkpoint (step {last_good}) is in {checkpoint_dir}: resume "
             f"from it with a lower learning rate" if last_good is not None
             else "no checkpoint was written yet")
    return TrainingError(f"{what} at step {step + 1}; training stopped before applying it "
                         f"({where}). Lower the learning rate, use gradient clipping or a "
                         f"wider format")


def _one_step(model, data, loss_fn, optimizer, params, step, steps, result, bar, state, *,
              checkpoint_dir, checkpoint_every, meta, masks, precision, grad_clip, schedule,
              deadline) -> bool:
    """One optimizer step (and maybe a checkpoint); returns True when time is up."""
    t0 = time.perf_counter()
    batch = _batch(data, step)
    with precision.autocast() if precision else _null():
        loss = loss_fn(model, batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _stop(f"loss is {value}", step, state["last_good"], checkpoint_dir)
    optimizer.zero_grad(set_to_none=True)
    if schedule == "cosine":
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * (1 + math.cos(math.pi * step / steps)) / 2
    scaler = precision.scaler if precision is not None else None
    if precision is not None:
        precision.backward(loss)
    else:
        loss.backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip true gradients; an overflow skips the step below
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params or model.parameters(), grad_clip)
        if scaler is None and not math.isfinite(float(norm)):
            raise _stop(f"the gradient norm is {float(norm)}", step, state["last_good"],
                        checkpoint_dir)
    stepped = precision.step(optimizer) if precision is not None else (optimizer.step() or True)
    if not stepped:
        result.skipped_steps += 1
    if masks is not None:
        masks.apply(model)
    result.losses.append(value)
    dt = time.perf_counter() - t0
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"loss {value:.4f}, {dt:.2f} s/step")
    done = step + 1
    out_of_time = deadline is not None and time.perf_counter() > deadline
    if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps
                                       or out_of_time):
        result.checkpoint = save_checkpoint(checkpoint_dir, model, optimizer, done,
                                            result.losses, meta, precision)
        state["last_good"] = done
    result.steps = done
    return out_of_time


def train(model: nn.Module, data: Sequence | Callable[[int], object],
          loss_fn: Callable[[nn.Module, object], torch.Tensor], *, steps: int,
          optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-4,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50,
          resume: bool = False, meta: dict | None = None, masks=None,
          precision: MixedPrecision | None = None, grad_clip: float | None = 1.0,
          progress: bool = True, seed: int = 0, max_seconds: float | None = None,
          schedule: str = "constant") -> TrainResult:
    """Run ``steps`` optimizer steps of ``loss_fn(model, batch)`` (see the module doc).

    ``optimizer`` defaults to AdamW over the parameters with ``requires_grad``; ``masks``
    (``pruning.Masks``) are re-applied after each step; ``precision`` is a
    ``MixedPrecision`` (autocast and loss scaling); ``max_seconds`` ends training early
    (after a checkpoint) once that much time has passed; ``result.steps`` is the last step.
    ``schedule``: ``constant`` or ``cosine`` (each group's learning rate decays as
    ``lr * (1 + cos(pi * step / steps)) / 2``; a function of the step, so resuming is exact).
    """
    if schedule not in SCHEDULES:
        raise TrainingError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 1:
        raise TrainingError(f"steps must be >= 1, got {steps}")
    if resume and checkpoint_dir is None:
        raise TrainingError("resume needs the checkpoint folder (checkpoint_dir / --resume DIR)")
    meta = dict(meta or {})
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise TrainingError("no parameter requires a gradient: nothing to train")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = TrainResult(steps=steps)
    start = 0
    if resume:
        state = load_checkpoint(checkpoint_dir, model, optimizer, meta, precision)
        start, result.losses = int(state["step"]), list(state["losses"])
        result.resumed_from = start
    else:
        torch.manual_seed(seed)
    last_good = start if resume else None
    model.train()
    bar = _progress(steps, start, progress)
    t_start = time.perf_counter()
    state = {"last_good": last_good}
    try:
        for step in range(start, steps):
            if _one_step(model, data, loss_fn, optimizer, params, step, steps, result, bar,
                         state, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, meta=meta, masks=masks,
                         precision=precision, grad_clip=grad_clip, schedule=schedule,
                         deadline=None if max_seconds is None else t_start + max_seconds):
                break
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t_start
    return result


def _null():
    import contextlib

    return contextlib.nullcontext()


def _progress(steps: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="training", unit="step", disable=None)
