"""Quantization-aware training: ``prepare_qat`` swaps in fake-quant modules, ``convert``
packs the trained model into the same quantized modules post-training quantization makes.

``prepare_qat(model, recipe, config)`` replaces every ``nn.Linear`` and ``nn.Conv2d`` the
recipe quantizes with ``FakeQuantLinear`` / ``FakeQuantConv2d`` that share the original
parameters (tied weights stay tied). Weights are fake-quantized with the recipe's format,
granularity, symmetry and scale dtype; activations as the recipe's ``ActivationSpec`` says
(per-token dynamic, or static ranges from an observer that freezes after
``config.freeze_after`` steps); convolutions are quantized weight-only, as
``QuantizedConv2d`` runs them. ``QATConfig.scales`` picks fixed min/max scales or LSQ /
LSQ+ learnable ones; ``QATConfig.train`` picks what receives gradients:

- ``all``: weights, biases, learnable scales and every other parameter;
- ``scales``: only the quantizers' scales and offsets (the PEQA recipe: Kim et al., 2023,
  "Memory-Efficient Fine-Tuning of Compressed LLMs via sub-4-bit Integer Quantization");
- ``lora``: low-rank adapters ``W + (alpha/r) B A`` (Hu et al., 2021) merged before
  fake quantization, plus the scales; the base weights get no optimizer state.

``convert(model)`` rounds each weight with the parameters its forward pass used
(``lowbit.formats.quantize``) and installs ``QuantizedLinear`` / ``QuantizedConv2d``, so
``save``, ``load`` and ``evaluate`` work as after ``quantize``. Converting right after
``prepare_qat`` with fixed scales is plain round-to-nearest PTQ.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.model.recipe import Recipe, RecipeError, Scheme, match_pattern
from lowbit.model.summary import QuantizeSummary, _tensor_bytes
from lowbit.model.targets import _set_module, cast_unquantized, compute_dtype
from lowbit.nn import QuantizedLinear, WeightSpec
from lowbit.nn.conv import QuantizedConv2d, conv_args_of
from lowbit.nn.fake_quant import FakeQuantConv2d, FakeQuantizer, FakeQuantLinear, QuantizerSpec

SCALES = ("minmax", "lsq", "lsq+")
TRAIN = ("all", "scales", "lora")


@dataclass(frozen=True)
class QATConfig:
    """How ``prepare_qat`` sets up training (saved beside the recipe in checkpoints).

    ``scales``: ``minmax`` (recomputed from the weight each step), ``lsq`` or ``lsq+``;
    ``init``: where learnable weight scales start (``minmax``, ``mse``, ``lsq``);
    ``freeze_after``: steps a static activation observer sees before its range freezes;
    ``train``: ``all``, ``scales`` or ``lora`` (rank ``lora_rank``, ``lora_alpha``).
    """

    scales: str = "minmax"
    init: str = "minmax"
    freeze_after: int = 100
    train: str = "all"
    lora_rank: int = 8
    lora_alpha: float | None = None
    convs: bool = True

    def __post_init__(self) -> None:
        if self.scales not in SCALES:
            raise RecipeError(f"QAT scales must be one of {SCALES}, got {self.scales!r}")
        if self.train not in TRAIN:
            raise RecipeError(f"QAT train must be one of {TRAIN}, got {self.train!r}")
        if self.train == "scales" and self.scales == "minmax":
            raise RecipeError("train='scales' trains the quantizers' scales: use "
                              "scales='lsq' or 'lsq+' with it")
        if self.train == "lora" and self.lora_rank < 1:
            raise RecipeError(f"train='lora' needs lora_rank >= 1, got {self.lora_rank}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QATConfig:
        return cls(**d)


def weight_spec_for(scheme: Scheme, config: QATConfig) -> QuantizerSpec:
    w = scheme.weight
    learnable = None if config.scales == "minmax" else config.scales
    symmetric = w.symmetric and learnable != "lsq+"
    init = "mse" if scheme.observer == "mse" and config.init == "minmax" else config.init
    return QuantizerSpec(w.format, w.granularity, symmetric, w.scale_dtype, learnable,
                         init=init, integer_zero_point=w.integer_zero_point or not symmetric
                         and learnable is not None)


def activation_spec_for(scheme: Scheme, config: QATConfig) -> QuantizerSpec | None:
    act = scheme.activation
    if act is None:
        return None
    if act.mode == "dynamic":
        return QuantizerSpec(act.format, act.granularity, act.symmetric, dynamic=True)
    learnable = "lsq" if config.scales != "minmax" and act.symmetric else None
    return QuantizerSpec(act.format, "tensor", act.symmetric, learnable=learnable,
                         observer=act.observer, freeze_after=config.freeze_after)


def qat_targets(model: nn.Module, recipe: Recipe, convs: bool = True
                ) -> list[tuple[str, nn.Module, Scheme | None]]:
    """Every ``nn.Linear`` (and ``nn.Conv2d``) with the scheme it gets."""
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    found = [(n, m) for n, m in model.named_modules() if type(m) in kinds]
    if not found:
        raise RecipeError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers, so "
                          f"there is nothing to train with quantization")
    names = [n for n, _ in found]
    for pattern in [r.pattern for r in recipe.rules if not r.optional] + list(recipe.keep):
        if not any(match_pattern(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.3)
            raise RecipeError(f"recipe pattern {pattern!r} matches no Linear/Conv2d layer; near "
                              f"matches: {', '.join(close) or 'none'}")
    return [(n, m, recipe.scheme_for(n)) for n, m in found]


def prepare_qat(model: nn.Module, recipe: Recipe | str, config: QATConfig | None = None,
                **overrides) -> nn.Module:
    """Swap fake-quant modules into ``model`` (in place) and return it, in train mode.

    ``overrides`` are ``QATConfig`` fields (``prepare_qat(m, "w4g32", scales="lsq")``).
    """
    recipe = Recipe.parse(recipe)
    config = config or QATConfig()
    if overrides:
        config = QATConfig(**{**config.to_dict(), **overrides})
    if any(isinstance(m, (FakeQuantLinear, FakeQuantConv2d)) for m in model.modules()):
        raise RecipeError("the model already holds fake-quant modules: prepare_qat once")
    layers = 0
    for name, module, scheme in qat_targets(model, recipe, config.convs):
        if scheme is None or scheme.weight is None:
            continue
        if scheme.algorithm != "rtn":
            raise RecipeError(f"QAT learns its own rounding; recipe {recipe.name!r} asks for "
                              f"{scheme.algorithm!r}: use the plain recipe (e.g. 'w4g32')")
        if scheme.activation is not None and config.scales == "lsq+":
            raise RecipeError(f"layer {name!r}: LSQ+ learns weight offsets, but "
                              f"{recipe.name!r} runs int8 x int8 kernels that need "
                              f"symmetric weights: use scales='lsq'")
        wspec, aspec = weight_spec_for(scheme, config), activation_spec_for(scheme, config)
        lora = config.lora_rank if config.train == "lora" else 0
        kwargs = {"lora_rank": lora, "lora_alpha": config.lora_alpha}
        if isinstance(module, nn.Conv2d):
            conv_args_of(module)  # refuses what QuantizedConv2d cannot hold, before training
            # weight-only: QuantizedConv2d has no integer activation kernel to convert to
            new = FakeQuantConv2d.from_conv(module, wspec, None, **kwargs)
        else:
            new = FakeQuantLinear.from_linear(module, wspec, aspec, **kwargs)
        _set_module(model, name, new)
        layers += 1
    if layers == 0:
        raise RecipeError(f"recipe {recipe.name!r} quantizes no weights (cast-only recipes such "
                          f"as fp16/bf16 need no QAT: see lowbit.training.MixedPrecision)")
    set_trainable(model, config.train)
    model.lowbit_recipe = recipe
    model.lowbit_qat_config = config
    return model.train()


def set_trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``train`` (``all``, ``scales``, ``lora``); returns the
    parameters that train."""
    if train not in TRAIN:
        raise RecipeError(f"train must be one of {TRAIN}, got {train!r}")
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer)
                        for p in m.parameters(recurse=False)}
    lora_params = {id(p) for m in model.modules()
                   if isinstance(m, (FakeQuantLinear, FakeQuantConv2d)) and m.lora_a is not None
                   for p in (m.lora_a, m.lora_b)}
    trainable = []
    for p in model.parameters():
        ok = (train == "all" or id(p) in quantizer_params
              or (train == "lora" and id(p) in lora_params))
        p.requires_grad_(ok)
        if ok:
            trainable.append(p)
    return trainable


def convert(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Replace every fake-quant module with its packed quantized module (in place)."""
    recipe = getattr(model, "lowbit_recipe", None)
    summary = QuantizeSummary(recipe.name if isinstance(recipe, Recipe) else "qat")
    fakes = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))]
    if not fakes:
        raise RecipeError("the model holds no fake-quant modules: call prepare_qat first")
    for name, fake in fakes:
        codes, qparams = fake.quantized_weight()
        spec = fake.weight_quantizer.spec
        wspec = WeightSpec(spec.format, spec.granularity, qparams.zero_point is None,
                           spec.scale_dtype,
                           qparams.zero_point is None or not qparams.zero_point.is_floating_point())
        bias = None if fake.bias is None else fake.bias.detach()
        summary.bytes_before += _tensor_bytes(fake.weight) + _tensor_bytes(fake.bias)
        if isinstance(fake, FakeQuantConv2d):
            new = QuantizedConv2d.from_codes(codes, qparams, wspec, bias, **conv_args_of(fake))
        else:
            activation, input_qparams = _activation_of(fake, model, name)
            new = QuantizedLinear.from_codes(codes, qparams, wspec, bias, activation=activation,
                                             input_qparams=input_qparams, backend=backend)
        _set_module(model, name, new)
        summary.layers += 1
        summary.bytes_after += new.weight_nbytes() + _tensor_bytes(new.bias)
        summary.kernels[new.kernel] = summary.kernels.get(new.kernel, 0) + 1
    if isinstance(recipe, Recipe):
        cast_unquantized(model, compute_dtype(recipe))
    for p in model.parameters():
        p.requires_grad_(False)
    model.lowbit_summary = summary
    if hasattr(model, "lowbit_qat_config"):
        del model.lowbit_qat_config
    return model.eval()


def _activation_of(fake: FakeQuantLinear, model: nn.Module, name: str):
    """The ``ActivationSpec`` and calibrated input parameters of a fake-quant linear."""
    quantizer = fake.input_quantizer
    if quantizer is None:
        return None, None
    recipe = getattr(model, "lowbit_recipe", None)
    scheme = recipe.scheme_for(name) if isinstance(recipe, Recipe) else None
    if scheme is None or scheme.activation is None:
        raise RecipeError(f"{name}: activation quantization needs the recipe's ActivationSpec "
                          f"(model.lowbit_recipe) to convert")
    if scheme.activation.mode == "dynamic":
        return scheme.activation, None
    return scheme.activation, quantizer.qparams()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what an optimizer should get), shared ones once."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def fake_quant_bytes(model: nn.Module) -> int:
    """Bytes the fake-quant layers will take once converted (codes + parameters)."""
    from lowbit.formats import packed_size

    total = 0
    for m in model.modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantConv2d)):
            codes, qp = m.quantized_weight()
            total += codes.shape[0] * packed_size(codes.shape[1], qp.format.bits)
            total += _tensor_bytes(qp.scale) + _tensor_bytes(qp.zero_point)
    return total
