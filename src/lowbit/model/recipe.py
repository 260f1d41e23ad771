"""Recipes: typed, validated, versioned descriptions of what ``quantize`` does.

A recipe maps module names to a ``Scheme`` (weight format + granularity + symmetry +
observer, optional activation quantization, algorithm). Rules are glob patterns
(``model.layers.*.mlp.*``) or regular expressions (``re:.*proj$``); the first rule that
matches wins, else ``default`` applies; ``keep`` lists modules left as they are.
Only ``nn.Linear`` modules are quantized: the embedding lookup stays as it is. The output
head (``lm_head``, tied to the embedding in SmolLM2; the largest matrix, and the one whose
error reaches the logits undamped) gets int8 per channel (``HEAD_SCHEME``, an explicit rule
visible in ``to_json()``) in every preset or grammar recipe below 6 bits, as llama.cpp's
Q4_K_M / Q3_K mixes keep ``output.weight`` at Q6_K; ``keep=["lm_head"]`` leaves it as it is.

Short names (``Recipe.parse``): see ``PRESETS``; also the grammar
``w<bits>[g<group>][a8[-static]][-<algorithm>][-rot][-izp]`` for integer weights; ``-rot``
quantizes in a Hadamard-rotated basis (``formats.rotation``; with RTN, SmoothQuant, GPTQ or
AWQ+GPTQ), ``-izp`` keeps integer zero-points. Any name may end in ``-frot`` (the residual
stream rotated and folded into the weights first) and ``(option=value,...)`` (the
algorithm's options, ``algorithms.registry``); ``gguf:<type>[-<algorithm>]`` solves on the
grids llama-quantize's file type ``<type>`` gives each tensor (``gguf_grids``, ``gguf_mixes``:
q8_0 ... q2_k and the mixes q4_k_m, q3_k_m, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lowbit.algorithms import algorithm_names, get_algorithm
from lowbit.algorithms.registry import format_options, parse_options
from lowbit.errors import LowbitError
from lowbit.formats import Granularity, get_format
from lowbit.model import gguf_grids, gguf_mixes
from lowbit.model.scheme import RecipeError, Rule, Scheme, match_pattern
from lowbit.nn import ActivationSpec, WeightSpec

RECIPE_VERSION = 1
#: "auto": bf16 where the CPU has native bf16 matmuls, else fp32 (``lowbit.kernels.cpu``)
COMPUTE_DTYPES = ("auto", "bf16", "fp32", "fp16")


@dataclass(frozen=True)
class Recipe:
    name: str
    default: Scheme | None
    rules: tuple[Rule, ...] = ()
    keep: tuple[str, ...] = ()
    compute_dtype: str = "auto"
    version: int = RECIPE_VERSION
    #: "hadamard": the residual stream is rotated and the rotation folded into the weights
    #: before quantizing (``fold_rotation.py``; the ``-frot`` suffix)
    fold_rotation: str | None = None

    def __post_init__(self) -> None:
        if self.fold_rotation not in (None, "hadamard"):
            raise RecipeError(f"fold_rotation must be 'hadamard' or None, got "
                              f"{self.fold_rotation!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise RecipeError(f"compute_dtype must be one of {COMPUTE_DTYPES}")
        if self.version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is newer than this lowbit "
                              f"understands ({RECIPE_VERSION}): upgrade lowbit")

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme module ``name`` gets, or None when it is kept as it is."""
        if any(match_pattern(p, name) for p in self.keep):
            return None
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return self.default

    def with_keep(self, *patterns: str) -> Recipe:
        return replace(self, keep=self.keep + tuple(patterns))

    @property
    def needs_calibration(self) -> bool:
        schemes = [self.default] + [r.scheme for r in self.rules]
        return self.name.startswith("auto:") or any(
            s is not None and s.needs_calibration for s in schemes)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "lowbit_recipe_version": self.version,
            "name": self.name,
            "compute_dtype": self.compute_dtype,
            "default": None if self.default is None else self.default.to_dict(),
            "rules": [{"pattern": r.pattern, "scheme": r.scheme.to_dict()}
                      | ({"optional": True} if r.optional else {}) for r in self.rules],
            "keep": list(self.keep),
        } | ({"fold_rotation": self.fold_rotation} if self.fold_rotation else {})

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a mapping with keys {', '.join(RECIPE_KEYS)}; got "
                              f"{type(d).__name__}: see Recipe.to_dict() for the layout")
        unknown = sorted(set(d) - set(RECIPE_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; allowed: {', '.join(RECIPE_KEYS)}"
                              " (see Recipe.to_dict() for the layout)")
        rules, keep = d.get("rules", []), d.get("keep", [])
        if not (isinstance(rules, list) and all(
                isinstance(r, dict) and {"pattern", "scheme"} <= set(r) for r in rules)):
            raise RecipeError("recipe 'rules' must be a list of {pattern: ..., scheme: {...}} "
                              f"mappings, got {rules!r:.80}")
        if not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
            raise RecipeError(f"recipe 'keep' must be a list of module patterns, got {keep!r:.80}")
        try:
            return cls(
                name=d.get("name", "custom"),
                default=None if d.get("default") is None else Scheme.from_dict(d["default"]),
                rules=tuple(Rule(r["pattern"], Scheme.from_dict(r["scheme"]),
                                 bool(r.get("optional", False)))
                            for r in d.get("rules", [])),
                keep=tuple(d.get("keep", [])),
                compute_dtype=d.get("compute_dtype", "auto"),
                fold_rotation=d.get("fold_rotation"),
                version=int(d.get("lowbit_recipe_version", RECIPE_VERSION)),
            )
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            if isinstance(exc, LowbitError):
                raise
            raise RecipeError(
                f"malformed recipe: {exc}; see Recipe.to_dict() for the layout") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a ``.json`` or ``.yaml`` file (YAML read with ``safe_load``)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe file {path}: {exc}") from exc
        try:
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise RecipeError(f"recipe file {path} is not valid {path.suffix[1:].upper()}: "
                              f"{exc}; fix the syntax (write one with Recipe.to_yaml())") from exc
        try:
            return cls.from_dict(data)
        except LowbitError as exc:
            raise RecipeError(f"recipe file {path}: {exc}") from exc

    @classmethod
    def parse(cls, text: str | Recipe) -> Recipe:
        """A preset name, the ``w<bits>...`` grammar, or a path to a recipe file."""
        if isinstance(text, Recipe):
            return text
        key = str(text).strip()
        if key.endswith((".json", ".yaml", ".yml")):
            if not Path(key).is_file():
                raise RecipeError(f"recipe file {key} does not exist; check the path, or pass "
                                  "a preset or w<bits>[g<group>] name")
            return cls.load(key)
        base, options = _split_options(key)
        fold = base.lower().endswith(FOLD_SUFFIX)
        recipe = _named(base.lower().removesuffix(FOLD_SUFFIX) if fold else base.lower())
        if recipe is None:
            raise RecipeError(
                f"unknown recipe {text!r}; presets: {', '.join(PRESETS)}; or w<bits>[g<group>]"
                f"[a8[-static]][-<algorithm>][-rot][-izp][-frot][(option=value,...)] "
                f"(algorithms: {', '.join(algorithm_names())}), gguf:<type>[-<algorithm>], "
                f"auto:<bpw>[-<algorithm>][-rot], or a "
                f".json/.yaml file")
        if fold:
            recipe = replace(recipe, name=recipe.name + FOLD_SUFFIX, fold_rotation="hadamard")
        return recipe.with_options(options) if options else recipe

    def algorithm_options(self) -> dict[str, dict]:
        """Every algorithm this recipe runs with the options it runs with (defaults included),
        as manifests record them; ``{}`` for cast-only recipes."""
        out = {}
        for scheme in [self.default] + [r.scheme for r in self.rules]:
            if scheme is not None and scheme.weight is not None:
                resolved = get_algorithm(scheme.algorithm).resolve(scheme.options)
                key = scheme.algorithm + (f"({format_options(scheme.options)})"
                                          if scheme.options else "")
                out[key] = dataclasses.asdict(resolved)
        return out

    def with_options(self, options: str | dict) -> Recipe:
        """This recipe with algorithm ``options`` (``"refine_passes=4,percdamp=0.02"`` or a
        mapping) set in every scheme whose algorithm takes them; an option no scheme's
        algorithm takes is an error that lists the valid ones."""
        given = parse_options(options) if isinstance(options, str) else dict(options)
        schemes = [self.default] + [r.scheme for r in self.rules]
        takes = {name for s in schemes if s is not None and s.weight is not None
                 for name in get_algorithm(s.algorithm).option_names()}
        unknown = sorted(set(given) - takes)
        if unknown:
            algos = sorted({s.algorithm for s in schemes if s is not None})
            raise RecipeError(f"recipe {self.name!r} ({', '.join(algos)}) has no option "
                              f"{', '.join(unknown)}; its options: {', '.join(sorted(takes))}")

        def apply(scheme):
            if scheme is None or scheme.weight is None:
                return scheme
            own = {k: v for k, v in given.items()
                   if k in get_algorithm(scheme.algorithm).option_names()}
            return replace(scheme, options={**dict(scheme.options), **own}) if own else scheme

        rules = tuple(replace(r, scheme=apply(r.scheme)) for r in self.rules)
        fixed = replace(self, default=apply(self.default), rules=rules)
        shown = format_options(apply(self.default).options if self.default else ()) or \
            format_options(tuple(sorted(given.items())))
        return replace(fixed, name=f"{self.name.split('(')[0]}({shown})")

    def describe(self) -> str:
        return PRESET_DESCRIPTIONS.get(self.name, "custom recipe")


#: the algorithm is any word but the ``-rot`` / ``-izp`` suffixes that may follow it
_GRAMMAR = re.compile(
    r"w([1-8])(?:g(\d+))?(a8)?(-static)?(?:-(?!(?:rot|izp)(?:-|$))([a-z+]+))?(-rot)?(-izp)?")
_AUTO = re.compile(r"auto:(\d+(?:\.\d+)?)(?:bpw)?(?:-([a-z+]+?))?(-rot)?")


def _split_options(key: str) -> tuple[str, str]:
    """``"w4g64-gptq(refine_passes=4)"`` -> ``("w4g64-gptq", "refine_passes=4")``."""
    if key.endswith(")") and "(" in key:
        base, _, rest = key.partition("(")
        return base.strip(), rest[:-1]
    return key, ""


def _named(key: str) -> Recipe | None:
    if key in PRESETS:
        return PRESETS[key]
    if key.startswith("auto:"):  # mixed precision, resolved by quantize()
        return auto_placeholder(key)
    if key.startswith("gguf:"):
        return gguf_recipe(key)
    return _parse_grammar(key)


#: llama.cpp types whose grid a lowbit scheme is exactly (``model/gguf_grids.py``)
GGUF_GRIDS = gguf_grids.GGUF_GRIDS
#: what ``gguf:<kind>`` accepts: a single type's grid, or a llama-quantize mix (``gguf_mixes``)
GGUF_KINDS = tuple(GGUF_GRIDS) + tuple(k for k in gguf_mixes.MIX_DEFAULT if k not in GGUF_GRIDS)
_GGUF = re.compile(r"gguf:([a-z0-9_]+)(?:-([a-z+]+))?")


#: a ``gguf:`` recipe whose types are chosen per layer within ``<kind>``'s bytes (``gguf_auto``)
GGUF_AUTO = "gguf:auto:"


def gguf_recipe(key: str) -> Recipe:
    """``gguf:<kind>[-<algorithm>]``: weights on exactly the grids llama-quantize's file type
    ``<kind>`` gives each tensor (``gguf_mixes``: one type, or a mix such as ``q4_k_m``; a
    layer whose rows a k-quant cannot hold gets llama.cpp's fallback type, ``gguf_grids``),
    solved by any algorithm, so the GGUF export holds the solved codes unchanged; the head
    gets llama.cpp's output type (Q6_K, Q8_0 in a Q8_0 file), rounded. A mix's per-layer rules
    need the model: ``quantize`` resolves them (``resolve_gguf_mix``)."""
    auto = key.startswith(GGUF_AUTO)
    m = _GGUF.fullmatch(key.replace(GGUF_AUTO, "gguf:", 1))
    if not m or m.group(1) not in GGUF_KINDS:
        raise RecipeError(f"unknown GGUF recipe {key!r}; lowbit solves on llama.cpp's types "
                          f"and mixes {', '.join(GGUF_KINDS)} (gguf:<type>[-<algorithm>], "
                          f"e.g. gguf:q4_k_m-gptq; gguf:auto:<type>[-<algorithm>] chooses "
                          f"the types within <type>'s size)")
    kind, algorithm = m.groups()
    spec = gguf_grids.grid_spec(gguf_mixes.default_type(kind))
    return Recipe(key, Scheme(spec, algorithm=algorithm or "rtn"),
                  () if auto else gguf_mixes.head_rule(kind))


def gguf_kind(recipe: Recipe) -> str | None:
    """The llama.cpp type or mix a ``gguf:`` recipe names, else None."""
    m = re.match(r"gguf:(?:auto:)?([a-z0-9_]+)", recipe.name)
    return m.group(1) if m else None


def resolve_gguf_mix(model, recipe: Recipe) -> Recipe:
    """``recipe`` with its per-layer llama.cpp types when it names a mix; else ``recipe``."""
    kind = gguf_kind(recipe)
    if kind is None or not gguf_mixes.is_mix(kind) or recipe.name.startswith(GGUF_AUTO):
        return recipe
    return gguf_mixes.resolve_mix(model, recipe, kind)


def auto_placeholder(key: str) -> Recipe:
    """``auto:<bpw>[bpw][-<algorithm>][-rot]``: a recipe that ``quantize`` resolves with data
    (``model/mixed.py``; ``-rot``: every candidate quantizes in the Hadamard-rotated basis)."""
    m = _AUTO.fullmatch(key.strip().lower())
    if not m:
        raise RecipeError(f"cannot parse {key!r}: write auto:<bits per weight>[-<algorithm>]"
                          f"[-rot], e.g. auto:3.5, auto:3.5-gptq or auto:3.5-gptq-rot")
    algorithm, rot = m.group(2), m.group(3)
    if algorithm == "rot" and rot is None:
        algorithm, rot = None, "-rot"
    spec = WeightSpec("uint4", "group:128", False, "bf16", rotation="hadamard" if rot else None)
    scheme = Scheme(spec, algorithm=algorithm or "rtn")
    return Recipe(f"auto:{m.group(1)}" + (f"-{algorithm}" if algorithm else "") + (rot or ""),
                  scheme)


def is_auto(recipe: Recipe) -> bool:
    """An ``auto:<bpw>`` or unresolved ``gguf:auto:<type>`` recipe: ``quantize`` measures it."""
    return recipe.name.startswith("auto:") or (recipe.name.startswith(GGUF_AUTO)
                                               and not recipe.rules)


def budget_of(recipe: Recipe) -> float:
    return float(_AUTO.fullmatch(recipe.name.split("(")[0]).group(1))


#: a recipe name ending so (before any options) rotates the residual stream offline first
FOLD_SUFFIX = "-frot"
#: the keys ``Recipe.from_dict`` reads; others are refused (a typo would be silently ignored)
RECIPE_KEYS = ("lowbit_recipe_version", "name", "compute_dtype", "default", "rules", "keep",
               "fold_rotation")
MAX_GROUP = 1 << 16


def _parse_grammar(key: str) -> Recipe | None:
    m = _GRAMMAR.fullmatch(key)
    if not m:
        return None
    bits, group, a8, static, algorithm, rot, izp = m.groups()
    bits = int(bits)
    if group is not None and not 1 <= int(group) <= MAX_GROUP:
        raise RecipeError(f"{key!r}: group size {group} is out of range; use 1..{MAX_GROUP} "
                          "inputs per scale (32, 64 or 128 are usual)")
    if a8 is None and static:
        raise RecipeError(f"{key!r}: '-static' applies to activations; write w{bits}a8-static")
    gran = f"group:{group}" if group else "channel"
    # grouped low-bit weights are asymmetric (min/max + zero-point); per-channel symmetric
    symmetric = group is None
    fmt = f"int{bits}" if symmetric else f"uint{bits}"
    act = ActivationSpec("static", granularity="tensor") if static else (
        ActivationSpec("dynamic") if a8 else None)
    if act is not None:
        fmt, gran, symmetric = f"int{bits}", "channel", True
    # grouped weights keep bf16 scales: what the int4 kernel reads, so storage is exact
    scale_dtype = "bf16" if group else "fp32"
    if izp and (symmetric or act is not None):
        raise RecipeError(f"{key!r}: '-izp' (integer zero-points) applies to grouped "
                          f"asymmetric recipes such as w4g128-izp; per-channel and a8 "
                          "weights are symmetric and have no zero-point")
    # grouped asymmetric weights keep a float zero-point (grid = min + scale * k, Q4_1)
    # unless "-izp" asks for integer ones, which compressed-tensors and GPTQ files hold
    spec = WeightSpec(fmt, gran, symmetric, scale_dtype,
                      integer_zero_point=bool(izp) or _integer_zero(symmetric, gran),
                      rotation="hadamard" if rot else None)
    scheme = Scheme(spec, act, algorithm or "rtn")
    return Recipe(key, scheme, _head_rules(bits, act))


def _w(fmt: str, gran: str, symmetric: bool = True, rotation: str | None = None,
       **kw) -> Scheme:
    scale_dtype = "bf16" if gran.startswith("group") else "fp32"
    spec = WeightSpec(fmt, gran, symmetric, scale_dtype,
                      integer_zero_point=_integer_zero(symmetric, gran), rotation=rotation)
    return Scheme(spec, **kw)


def _integer_zero(symmetric: bool, gran: str) -> bool:
    """Float zero-points (2 bytes beside 16-bit scales, see ``compute_qparams``) for groups
    of 32 or more; below that they would cost more than half a bit per weight, so small
    groups keep a 1-byte integer zero-point."""
    if symmetric:
        return True
    g = Granularity.parse(gran)
    return g.kind != "group" or g.group_size < 32


#: the output head's scheme in recipes below ``HEAD_MIN_BITS``: int8, symmetric, one scale
#: per row, round to nearest (``benchmarks/calibration_domains.py --head`` compares choices)
HEAD_SCHEME = _w("int8", "channel")
HEAD_MIN_BITS = 6


def _head_rules(bits: int, activation: ActivationSpec | None = None,
                rotation: str | None = None) -> tuple[Rule, ...]:
    """``(Rule("lm_head", HEAD_SCHEME),)`` for weights below ``HEAD_MIN_BITS``, else ``()``;
    with int8 activations the head keeps the recipe's activation spec and rotation."""
    if bits >= HEAD_MIN_BITS:
        return ()
    if activation is None and rotation is None:
        return (Rule("lm_head", HEAD_SCHEME, optional=True),)
    return (Rule("lm_head", _w("int8", "channel", rotation=rotation, activation=activation),
                 optional=True),)


def _low(name: str, scheme: Scheme) -> Recipe:
    """A preset below 6 bits: ``scheme`` everywhere but the head (``_head_rules``)."""
    bits = get_format(scheme.weight.format).bits
    return Recipe(name, scheme, _head_rules(bits, scheme.activation, scheme.weight.rotation))


PRESETS: dict[str, Recipe] = {
    "fp16": Recipe("fp16", Scheme(weight=None), compute_dtype="fp16"),
    "bf16": Recipe("bf16", Scheme(weight=None), compute_dtype="bf16"),
    "fp8": Recipe("fp8", _w("fp8_e4m3", "channel")),
    "w8": Recipe("w8", _w("int8", "channel")),
    "w4g128": _low("w4g128", _w("uint4", "group:128", False)),
    "w4g64": _low("w4g64", _w("uint4", "group:64", False)),
    "w4g32": _low("w4g32", _w("uint4", "group:32", False)),
    "w3g64": _low("w3g64", _w("uint3", "group:64", False)),
    "w2g16": _low("w2g16", _w("uint2", "group:16", False)),
    "nf4g64": _low("nf4g64", _w("nf4", "group:64")),
    "w8a8": Recipe("w8a8", _w("int8", "channel", rotation="hadamard",
                              activation=ActivationSpec("dynamic"))),
    "w8a8-plain": Recipe("w8a8-plain", _w("int8", "channel",
                                          activation=ActivationSpec("dynamic"))),
    "w8a8-static": Recipe("w8a8-static", _w(
        "int8", "channel", activation=ActivationSpec("static", granularity="tensor"))),
    "w8a8-static-rot": Recipe("w8a8-static-rot", _w(
        "int8", "channel", rotation="hadamard",
        activation=ActivationSpec("static", granularity="tensor"))),
    "w4a8": _low("w4a8", _w("int4", "channel", rotation="hadamard",
                              activation=ActivationSpec("dynamic"))),
    "w8a8-outliers": Recipe("w8a8-outliers", _w(
        "int8", "channel", activation=ActivationSpec("dynamic"), outlier_channels=8)),
    # calibrated algorithms (lowbit.algorithms.registry); "imatrix": importance-weighted RTN
    "w4g128-gptq": _low("w4g128-gptq", _w("uint4", "group:128", False, algorithm="gptq")),
    "w4g128-awq": _low("w4g128-awq", _w("uint4", "group:128", False, algorithm="awq")),
    "w3g64-gptq": _low("w3g64-gptq", _w("uint3", "group:64", False, algorithm="gptq")),
    "w2g16-hqq": _low("w2g16-hqq", _w("uint2", "group:16", False, algorithm="hqq")),
    "w8a8-smooth": Recipe("w8a8-smooth", _w(
        "int8", "channel", activation=ActivationSpec("static", granularity="tensor"),
        algorithm="smoothquant")),
    "w8a8-smooth-rot": Recipe("w8a8-smooth-rot", _w(
        "int8", "channel", rotation="hadamard",
        activation=ActivationSpec("static", granularity="tensor"), algorithm="smoothquant")),
    "kmeans4": _low("kmeans4", Scheme(WeightSpec("codebook4", "channel", True, "fp16"),
                                        algorithm="kmeans")),
}

PRESET_DESCRIPTIONS = {
    "fp16": "every weight and activation in IEEE half precision",
    "bf16": "every weight and activation in bfloat16",
    "fp8": "FP8 E4M3 weights, one scale per output channel; bf16 activations",
    "w8": "int8 weights, symmetric, one scale per output channel; bf16 activations",
    "w4g128": "4-bit weights, asymmetric, one scale + zero-point per 128 inputs",
    "w4g64": "4-bit weights, asymmetric, one scale + zero-point per 64 inputs",
    "w4g32": "4-bit weights, asymmetric, groups of 32 (SmolLM2's own Q4_1 grid: the easy case)",
    "w3g64": "3-bit weights, asymmetric, groups of 64",
    "w2g16": "2-bit weights, asymmetric, groups of 16",
    "nf4g64": "NF4 (normal-float codebook) weights, absmax scale per 64 inputs",
    "w8a8": "int8 weights + int8 activations quantized per token at run time, both in a "
    "Hadamard-rotated basis (QuaRot-style) that spreads outlier channels",
    "w8a8-plain": "w8a8 without the rotation (what torchao's int8 dynamic config does)",
    "w8a8-static": "int8 weights + int8 activations with calibrated per-tensor scales",
    "w4a8": "4-bit per-channel weights + int8 per-token activations, Hadamard-rotated",
    "w8a8-static-rot": "w8a8-static in a Hadamard-rotated basis: one calibrated scale per "
    "tensor for the rotated activations",
    "w8a8-outliers": "w8a8, but the 8 input channels with the largest calibration "
    "activations of each layer stay in bf16 (LLM.int8()-style)",
    "w4g128-gptq": "4-bit g128 weights chosen by GPTQ (Hessian error compensation)",
    "w4g128-awq": "4-bit g128 weights with AWQ activation-aware scales and clipping",
    "w3g64-gptq": "3-bit g64 weights chosen by GPTQ",
    "w2g16-hqq": "2-bit g16 weights with HQQ-optimised float zero-points (no data)",
    "w8a8-smooth": "SmoothQuant: int8 weights + static int8 activations, outliers migrated",
    "w8a8-smooth-rot": "SmoothQuant scales, then a Hadamard rotation of the smoothed input "
    "(SmoothRot-style): static int8 activations without channel or token outliers",
    "kmeans4": "4-bit per-row k-means codebooks (16 fp16 centroids per row)",
}
