"""Mixed-precision training: autocast FP16 / BF16 with dynamic loss scaling, or FP8.

Mixed precision (Micikevicius et al., 2018, "Mixed Precision Training"): master weights
stay FP32, the forward and backward passes run in a 16-bit dtype (``torch.autocast``), and
for FP16, whose range is narrow, the loss is multiplied by a scale ``S`` before backward so
small gradients do not flush to zero (sec. 3.2). Gradients are divided by ``S`` before the
optimizer step. Dynamic loss scaling (sec. 3.2; as in apex / ``torch.amp.GradScaler``):

- overflow detection: any non-finite gradient after unscaling;
- on overflow the optimizer step is skipped and ``S <- S * backoff_factor`` (0.5);
- after ``growth_interval`` consecutive good steps ``S <- S * growth_factor`` (2).

BF16 has FP32's exponent range and needs no loss scaling. ``fp8`` swaps linears for
``lowbit.training.fp8.Fp8Linear`` (E4M3 forward, E5M2 gradients, delayed scaling).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lowbit.training.errors import TrainingError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    """Dynamic loss scale: skip the step and back off on overflow, grow after good steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval >= 1):
            raise TrainingError("LossScaler needs init_scale > 0, growth_factor > 1, "
                                "0 < backoff_factor < 1 and growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0
        self.skipped_steps = 0
        self._found_inf: bool | None = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S`` (call ``.backward()`` on the result)."""
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide every gradient by ``S`` in place; returns True when one is not finite."""
        if self._found_inf is not None:
            return self._found_inf
        found = False
        inv = 1.0 / self.scale
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.grad.mul_(inv)
                if not found and not torch.isfinite(p.grad).all():
                    found = True
        self._found_inf = found
        return found

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale, then ``optimizer.step()`` unless a gradient overflowed; then
        ``update()``. Returns True when the step was taken."""
        found = self.unscale_(optimizer)
        if not found:
            optimizer.step()
        self.update()
        return not found

    def update(self) -> None:
        """Back off after an overflow, grow after ``growth_interval`` good steps."""
        if self._found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, 2.0**64)
                self.good_steps = 0
        self._found_inf = None

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


class MixedPrecision:
    """One object for a training loop: ``with mp.autocast(): loss = ...``,
    ``mp.backward(loss)``, ``mp.step(optimizer)`` (False when the step was skipped).

    ``precision``: ``fp32``, ``bf16``, ``fp16`` (with a ``LossScaler``) or ``fp8`` (call
    ``mp.prepare(model)`` first to swap in ``Fp8Linear``).
    """

    def __init__(self, precision: str = "bf16", *, device_type: str = "cpu",
                 loss_scaler: LossScaler | None = None) -> None:
        if precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.device_type = device_type
        if loss_scaler is None and precision == "fp16":
            loss_scaler = LossScaler()
        self.scaler = loss_scaler

    def prepare(self, model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
        """For ``fp8``: swap ``nn.Linear`` layers for ``Fp8Linear`` (in place)."""
        if self.precision == "fp8":
            from lowbit.training.fp8 import to_fp8_training

            to_fp8_training(model, skip=skip)
        return model

    def autocast(self):
        if self.precision in _DTYPES:
            return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if not math.isfinite(float(loss.detach())):
            raise TrainingError(f"loss is {float(loss.detach())}; not back-propagating it")
        (self.scaler.scale_loss(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.scaler is not None:
            return self.scaler.step(optimizer)
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"precision": self.precision,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
