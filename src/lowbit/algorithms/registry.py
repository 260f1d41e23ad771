"""Which algorithms exist, what each reads and which options it takes: one registry.

An algorithm is an ``Algorithm`` entry, registered by the module that implements it (its
last lines), so adding one touches that module, ``algorithms/__init__.py``'s import list
and its test. The entry says:

- ``needs``: the statistics of a group's shared input it reads (``stats.InputStats``:
  ``hessian`` = ``2/n X^T X``, ``cross`` = GPTAQ's float-model moment, ``absmean``,
  ``absmax``, ``sample`` = a token sample, ``diag`` = mean ``x^2``);
- ``needs_data``: without calibration data it falls back to round to nearest (k-means and
  HQQ do not need data, ``diag`` only sharpens k-means);
- ``input_scale``: ``"awq"`` or ``"smoothquant"`` when it chooses a per-input-channel scale
  for the whole group (folded into the feeder, ``group.group_scale``), found by the
  ``search`` of the entry of that name;
- ``rotates``: it can solve in a Hadamard-rotated basis (``WeightSpec.rotation``);
- ``options``: a frozen dataclass of its options (``GPTQ``, ``AWQ``, ...), with
  ``defaults`` the values lowbit's recipes use where they differ from the class's;
- ``solve(W, scheme, stats, s, options)``: ``(codes, QParams or centroids, info)`` for the
  weight ``W diag(s)`` of one member (or several stacked members) of a group.

Options travel in recipes as text, ``w4g64-gptq(refine_passes=4,percdamp=0.02)``
(``parse_options``), and in recipe files and manifests as a mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowbit.algorithms.base import AlgorithmError


@dataclass(frozen=True)
class NoOptions:
    """An algorithm without options."""


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    solve: Callable
    options: type = NoOptions
    defaults: tuple[tuple[str, Any], ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)
    needs_data: bool = False
    input_scale: str | None = None
    #: ``search(members, stats, options) -> (s, info)`` of an ``input_scale`` algorithm
    search: Callable | None = None
    rotates: bool = False

    def resolve(self, overrides: tuple[tuple[str, Any], ...] = ()) -> Any:
        """The options instance for a scheme's ``overrides`` on top of the defaults."""
        return self.options(**{**dict(self.defaults), **dict(overrides)})

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def check(self, overrides: dict) -> tuple[tuple[str, Any], ...]:
        """``overrides`` as a sorted tuple, typed like the options' defaults; errors name
        the valid options."""
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        out = {}
        for key, value in overrides.items():
            if key not in fields:
                valid = ", ".join(fields) or "none"
                raise AlgorithmError(f"{self.name} has no option {key!r}; its options: {valid}")
            out[key] = _typed(key, value, _default_of(fields[key]))
        try:
            self.resolve(tuple(out.items()))
        except (TypeError, ValueError) as exc:
            raise AlgorithmError(f"{self.name} options {out}: {exc}") from exc
        return tuple(sorted(out.items()))


REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return REGISTRY[name]
    except KeyError:
        raise AlgorithmError(f"unknown algorithm {name!r}; use one of "
                             f"{', '.join(REGISTRY)}") from None


def algorithm_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def parse_options(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` as a mapping of strings (typed later by ``Algorithm.check``)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise AlgorithmError(f"algorithm option {part!r} is not key=value; write e.g. "
                                 f"w4g64-gptq(refine_passes=4,percdamp=0.02)")
        out[key.strip()] = value.strip()
    return out


def format_options(options: tuple[tuple[str, Any], ...]) -> str:
    """The inverse of ``parse_options`` (tuples joined by ``/``)."""
    def text(v):
        if isinstance(v, tuple):
            return "/".join(text(x) for x in v)
        return str(v).lower() if isinstance(v, bool) or v is None else str(v)
    return ",".join(f"{k}={text(v)}" for k, v in options)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` (text from a recipe string, or a JSON value) converted to ``default``'s type."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(float(v) for v in value.split("/") if v)
        if default is None and value.lower() == "none":
            return None
    except ValueError:
        raise AlgorithmError(f"option {key}={value!r}: expected a value like "
                             f"{default!r}") from None
    return value
