"""Which elements share one scale: per-tensor, per-channel, per-group, per-token.

Shapes of the parameters (scale, zero-point) for an input ``x``:
- ``tensor``: ``()``;
- ``channel`` on ``axis``: ``(x.shape[axis],)``;
- ``token`` (activations, dynamic): ``x.shape[:-1]`` (one scale per row of the last axis);
- ``group`` of ``group_size`` along the last axis: ``x.shape[:-1] + (ceil(K / group_size),)``.

Groups that do not divide: the last group of a row is shorter (``K % group_size``
elements). Its statistics come from its real elements only (padding with zeros does not
change an absmax, and the asymmetric range always includes 0), the group size is never
changed and no row is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError

KINDS = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class Granularity:
    kind: str = "tensor"
    axis: int = 0
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown granularity {self.kind!r}; use one of {KINDS}")
        if self.kind == "group" and self.group_size < 1:
            raise FormatError(f"per-group granularity needs group_size >= 1, got {self.group_size}")

    @classmethod
    def per_tensor(cls) -> Granularity:
        return cls("tensor")

    @classmethod
    def per_channel(cls, axis: int = 0) -> Granularity:
        return cls("channel", axis=axis)

    @classmethod
    def per_group(cls, group_size: int) -> Granularity:
        return cls("group", axis=-1, group_size=group_size)

    @classmethod
    def per_token(cls) -> Granularity:
        return cls("token", axis=-1)

    @classmethod
    def parse(cls, text: str | Granularity) -> Granularity:
        """``tensor``, ``channel``, ``channel:1``, ``group:128`` (or ``g128``), ``token``."""
        if isinstance(text, Granularity):
            return text
        t = str(text).strip().lower()
        if t.startswith("g") and t[1:].isdigit():
            return cls.per_group(int(t[1:]))
        name, _, arg = t.partition(":")
        if name in ("tensor", "per_tensor", "per-tensor"):
            return cls.per_tensor()
        if name in ("channel", "per_channel", "per-channel"):
            return cls.per_channel(int(arg) if arg else 0)
        if name in ("group", "per_group", "per-group"):
            if not arg.isdigit():
                raise FormatError(f"group granularity needs a size, e.g. 'group:128', got {text!r}")
            return cls.per_group(int(arg))
        if name in ("token", "per_token", "per-token"):
            return cls.per_token()
        raise FormatError(
            f"unknown granularity {text!r}; use tensor, channel[:axis], group:N or token"
        )

    def __str__(self) -> str:
        if self.kind == "group":
            return f"group:{self.group_size}"
        if self.kind == "channel":
            return f"channel:{self.axis}"
        return self.kind

    # -- shapes ------------------------------------------------------------------------
    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.kind == "tensor":
            return ()
        if not shape:
            raise FormatError(f"{self} granularity needs a tensor with at least one dimension")
        if self.kind == "channel":
            return (shape[self._axis(shape)],)
        if self.kind == "token":
            return shape[:-1]
        return shape[:-1] + (math.ceil(shape[-1] / self.group_size),)

    def _axis(self, shape: tuple[int, ...]) -> int:
        if not -len(shape) <= self.axis < len(shape):
            raise FormatError(f"channel axis {self.axis} is out of range for shape {shape}")
        return self.axis % len(shape)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a 2-D tensor whose rows are the sets of elements sharing one parameter.

        Groups are zero-padded to ``group_size`` (see the module docstring).
        """
        if self.kind == "tensor":
            return x.reshape(1, -1)
        if self.kind == "channel":
            axis = self._axis(tuple(x.shape))
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)
        if self.kind == "token":
            return x.reshape(-1, x.shape[-1])
        k, g = x.shape[-1], self.group_size
        pad = (-k) % g
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(-1, g)

    def expand(self, param: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """``param`` (of ``param_shape(shape)``) broadcastable against a tensor of ``shape``."""
        shape = tuple(shape)
        if self.kind == "tensor":
            return param
        if self.kind == "channel":
            view = [1] * len(shape)
            view[self._axis(shape)] = shape[self._axis(shape)]
            return param.reshape(view)
        if self.kind == "token":
            return param.unsqueeze(-1)
        return param.repeat_interleave(self.group_size, dim=-1)[..., : shape[-1]]


PER_TENSOR = Granularity.per_tensor()
