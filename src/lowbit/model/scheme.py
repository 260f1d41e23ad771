"""What one module gets (``Scheme``), and which modules a rule matches (``Rule``).

A scheme is the one weight spec (``formats.WeightSpec``: format, granularity, symmetry,
scale dtype, rotation) plus optional activation quantization, the algorithm that chooses
the values (``algorithms.registry``), the weight observer, and the algorithm's options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lowbit.algorithms import AlgorithmError, algorithm_names, get_algorithm
from lowbit.algorithms.round_to_nearest import WEIGHT_OBSERVERS
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.formats.lookup import is_row_codebook
from lowbit.nn import ActivationSpec, WeightSpec


class RecipeError(LowbitError, ValueError):
    """A recipe that cannot be parsed or does not fit the model."""


@dataclass(frozen=True)
class Scheme:
    """What one module gets. ``weight=None`` means "cast only" (fp16 / bf16 recipes)."""

    weight: WeightSpec | None = field(default_factory=WeightSpec)
    activation: ActivationSpec | None = None
    algorithm: str = "rtn"
    observer: str = "minmax"
    outlier_channels: int = 0
    #: the algorithm's options that differ from lowbit's defaults, as sorted (name, value)
    #: pairs (``algorithms.registry``); a mapping is accepted and converted
    options: tuple = ()

    def __post_init__(self) -> None:
        try:
            algorithm = get_algorithm(self.algorithm)
            options = self.options if isinstance(self.options, dict) else dict(self.options)
            object.__setattr__(self, "options", algorithm.check(options))
        except AlgorithmError as exc:
            raise RecipeError(str(exc)) from None
        if self.observer not in WEIGHT_OBSERVERS:
            raise RecipeError(
                f"unknown weight observer {self.observer!r}; use one of {WEIGHT_OBSERVERS}")
        if self.weight is not None and self.weight.rotation is not None and (
                not algorithm.rotates or self.outlier_channels):
            rotating = ", ".join(n for n in algorithm_names() if get_algorithm(n).rotates)
            extra = " and outlier channels" if self.outlier_channels else ""
            raise RecipeError(
                f"a Hadamard input rotation runs with {rotating} (got {self.algorithm!r}"
                f"{extra}); drop 'rotation' (the '-rot' suffix) for AWQ alone, imatrix, "
                f"HQQ, k-means or outlier channels")
        codebook = self.weight is not None and is_row_codebook(get_format(self.weight.format))
        if self.weight is not None and (self.algorithm == "kmeans" and not codebook or codebook
                                        and self.algorithm not in ("kmeans", "rtn")):
            raise RecipeError(
                f"k-means fits per-row codebooks: it runs on codebook<bits> formats and they "
                f"need it (got {self.algorithm!r} on {self.weight.format}); use the preset "
                f"kmeans4, or weight format codebook<bits> with algorithm kmeans in a recipe "
                f"file")

    @property
    def needs_calibration(self) -> bool:
        return (bool(get_algorithm(self.algorithm).needs)
                or self.outlier_channels > 0
                or (self.activation is not None and self.activation.mode == "static"))

    def to_dict(self) -> dict:
        return {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "algorithm": self.algorithm,
            "observer": self.observer,
            "outlier_channels": self.outlier_channels,
        } | ({"options": dict(self.options)} if self.options else {})

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        d = dict(d)
        weight = d.pop("weight", None)
        act = d.pop("activation", None)
        return cls(weight=None if weight is None else WeightSpec(**weight),
                   activation=None if act is None else ActivationSpec(**act), **d)


@dataclass(frozen=True)
class Rule:
    """``scheme`` for the modules ``pattern`` matches; a rule that matches nothing is an
    error unless ``optional`` (the presets' head rule, for models without ``lm_head``)."""

    pattern: str
    scheme: Scheme
    optional: bool = False

    def matches(self, name: str) -> bool:
        return match_pattern(self.pattern, name)


def match_pattern(pattern: str, name: str) -> bool:
    """Glob (``*`` matches across dots) or ``re:`` full-match regular expression."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name) is not None
