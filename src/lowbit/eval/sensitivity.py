"""Per-layer sensitivity: quantize one layer (or one block) at a time and measure the KL
divergence it causes against the unquantized model on a few windows.

Each candidate is cheap: the chosen ``nn.Linear`` is swapped for a module that runs the
reference path of the ``QuantizedLinear`` that ``quantize`` would build with the recipe's
scheme (weight dequantized once, float32 matmul, activations fake-quantized as the scheme
says), so the number measures the format, not a kernel's bf16 rounding. The windows are scored
against the baseline's cached log-probabilities, then the original module is put back. Nothing
else in the model changes (the recipe's compute dtype is not applied).

Weights are rounded to nearest (RTN) whatever the recipe's algorithm says; static activation
ranges are calibrated once on the calibration slice of the corpus (tokens 20,000 onward).
With ``ray=`` (``lowbit sensitivity --ray``) the units are measured as Ray tasks
(``sensitivity_on_ray``), with the same numbers.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.targets import _set_module

__all__ = ["LayerSensitivity", "SensitivityError", "SensitivityResult", "block_of",
           "layer_sensitivity", "sensitivity"]

PER = ("layer", "block")


class SensitivityError(LowbitError, ValueError):
    """Sensitivity cannot be measured as asked; the message names the fix."""


@dataclass(frozen=True)
class LayerSensitivity:
    """What quantizing one unit (a layer, or every layer of a block) costs."""

    name: str  # the layer name, or the block prefix with --per block
    block: str  # e.g. "model.layers.3" ("lm_head" for modules outside numbered blocks)
    kind: str  # module type inside the block, e.g. "self_attn.q_proj" ("block" per block)
    index: int | None  # block number, None outside numbered blocks
    params: int  # weights quantized in this unit
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    delta_ppl_pct: float
    seconds: float


@dataclass
class SensitivityResult:
    recipe: str
    per: str
    window: int
    n_windows: int
    protocol: str
    data: str
    baseline_ppl: float
    rows: list[LayerSensitivity]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ranked(self) -> list[LayerSensitivity]:
        """Rows from the most to the least sensitive (by mean KLD)."""
        return sorted(self.rows, key=lambda r: r.kld_mean, reverse=True)

    def kld(self) -> dict[str, float]:
        return {r.name: r.kld_mean for r in self.rows}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.ranked()]
        return out

    def table(self, top: int | None = None) -> str:
        """Markdown table of the ranked rows (the first ``top`` when given)."""
        lines = ["| rank | unit | weights | mean KLD | p99 KLD | same top-1 | ΔPPL |",
                 "|---:|---|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(self.ranked()[:top], 1):
            lines.append(f"| {i} | `{r.name}` | {r.params:,} | {r.kld_mean:.5f} | "
                         f"{r.kld_p99:.4f} | {100 * r.top1_agreement:.1f}% | "
                         f"{r.delta_ppl_pct:+.3f}% |")
        return "\n".join(lines)


_NUMBERED = re.compile(r"^(?P<block>.*?\.(?P<index>\d+))\.(?P<kind>.+)$")


def block_of(name: str) -> tuple[str, int | None, str]:
    """``(block, index, kind)`` of a module name: the prefix through its first numeric part
    (``model.layers.3``), that number, and the rest (``self_attn.q_proj``). Modules outside
    numbered blocks (``lm_head``) are their own block with index None."""
    m = _NUMBERED.match(name)
    if m is None:
        return name, None, name
    return m["block"], int(m["index"]), m["kind"]


class _Simulated(nn.Module):
    """``QuantizedLinear.reference_forward`` with the weight dequantized once: activations
    fake-quantized as the scheme says (per token at run time, or with calibrated static
    qparams), then a float32 matmul. A test compares it with ``QuantizedLinear``."""

    def __init__(self, linear: nn.Linear, scheme, input_range=None) -> None:
        from lowbit.algorithms import quantize_weight
        from lowbit.formats import dequantize, get_format, qparams_from_range

        super().__init__()
        codes, qparams = quantize_weight(linear.weight, scheme.weight, scheme.observer)
        self.register_buffer("weight", dequantize(codes, qparams, torch.float32),
                             persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias, persistent=False)
        self.activation = scheme.activation
        self.rotation = scheme.weight.rotation
        self.input_qparams = None
        if self.activation is not None and self.activation.mode == "static":
            if input_range is None:
                raise SensitivityError("static activation quantization needs calibrated input "
                                       "ranges; pass calibration batches")
            lo, hi = input_range[0], input_range[1]  # per-tensor min / max
            self.input_qparams = qparams_from_range(lo, hi, get_format("int8"), symmetric=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.formats import compute_qparams, fake_quantize, rotate

        xf = x.float()
        if self.rotation is not None:
            xf = rotate(xf.double(), self.rotation).float()
        if self.activation is not None:
            qp = (compute_qparams(xf, "int8", "token") if self.activation.mode == "dynamic"
                  else self.input_qparams)
            xf = fake_quantize(xf, qp)
        return torch.nn.functional.linear(xf, self.weight, self.bias).to(x.dtype)


def _units(targets, names: Sequence[str] | None, per: str) -> list[tuple[str, list]]:
    """Group the quantizable targets into units (one layer, or the layers of one block)."""
    quantizable = {n: (m, s) for n, m, s in targets if s is not None and s.weight is not None}
    if names is not None:
        unknown = [n for n in names if n not in quantizable]
        if unknown:
            raise SensitivityError(
                f"{len(unknown)} name(s) are not Linear layers the recipe quantizes, e.g. "
                f"{unknown[0]!r}; pass names from lowbit.model.find_targets (quantized ones)")
        quantizable = {n: quantizable[n] for n in names}
    if not quantizable:
        raise SensitivityError("the recipe quantizes no Linear layer of this model (a cast-only "
                               "recipe such as bf16, or everything kept): pick a weight recipe "
                               "such as w4g128")
    units: dict[str, list] = {}
    for n, (m, s) in quantizable.items():
        key = n if per == "layer" else block_of(n)[0]
        units.setdefault(key, []).append((n, m, s))
    return list(units.items())


def _static_ranges(model, units, tokenizer, window: int, calibration) -> dict:
    static = [(n, m, s) for _, members in units for n, m, s in members
              if s.activation is not None and s.activation.mode == "static"]
    if not static:
        return {}
    from lowbit.model.calibration import collect_input_ranges

    if calibration is None:
        from lowbit.data import text

        calibration = text("pydoc", tokenizer, tokens=2 * window, seq_len=window)
    return collect_input_ranges(model, static, calibration, progress=False)


def sensitivity(
    model: nn.Module,
    tokenizer,
    recipe,
    *,
    names: Sequence[str] | None = None,
    per: str = "layer",
    data: str = "pydoc",
    window: int = 512,
    n_windows: int = 2,
    protocol: str = "full",
    calibration: Iterable | None = None,
    progress: bool = True,
    ray: str | bool | None = None,
) -> SensitivityResult:
    """KL divergence (and top-1, ΔPPL) caused by quantizing each layer or block alone.

    ``model`` is the unquantized model (it is left as it was); ``recipe`` a ``Recipe`` or its
    name; ``names`` restricts the layers measured (default: every layer the recipe quantizes).
    ``ray``: True / "local" measures the units as tasks on a local Ray cluster, an address on
    that cluster (default ``$LOWBIT_RAY``, else here); ``model`` must then come from
    ``load_model(name or path)``, which each worker repeats (``sensitivity_on_ray``).
    """
    from lowbit.model import Recipe
    from lowbit.model.distributed import ray_address

    if per not in PER:
        raise SensitivityError(f"per must be one of {PER}, got {per!r}")
    t0 = time.perf_counter()
    recipe = Recipe.parse(recipe)
    address = ray_address(ray)
    if address is not None:
        return sensitivity_on_ray(address, model, recipe, names=names, per=per, data=data,
                                  window=window, n_windows=n_windows, protocol=protocol,
                                  calibration=calibration, progress=progress)
    setup = prepare(model, tokenizer, recipe, names, per, data, window, n_windows, protocol,
                    calibration)
    rows = [measure_unit(model, setup, unit, members)
            for unit, members in _progress(setup.units, progress, per)]
    return SensitivityResult(recipe.name, per, window, n_windows, protocol, str(data),
                             setup.base_ppl, rows, setup.notes, time.perf_counter() - t0)


@dataclass
class Setup:
    """What every unit is measured against: the units, the scored windows, the baseline's
    log-probabilities and the static activation ranges."""

    per: str
    window: int
    n_windows: int
    protocol: str
    units: list[tuple[str, list]]
    notes: list[str]
    ids: torch.Tensor | None = None
    base_ppl: float = float("nan")
    base_lp: object = None
    ranges: dict = field(default_factory=dict)


def plan_units(model: nn.Module, recipe, names, per: str) -> tuple[list, list[str]]:
    """The units to measure and the notes that go with them (nothing is run)."""
    from lowbit.model.targets import drop_missing_rotations, find_targets
    from lowbit.nn import QuantizedLinear

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise SensitivityError("the model is already quantized; pass the unquantized model "
                               "(sensitivity quantizes one layer at a time itself)")
    units = _units(drop_missing_rotations(find_targets(model, recipe)), names, per)
    notes = []
    algorithms = {s.algorithm for _, members in units for _, _, s in members}
    if algorithms - {"rtn"}:
        notes.append(f"weights rounded to nearest; the recipe's {', '.join(sorted(algorithms))} "
                     "algorithm is not applied per layer")
    return units, notes


def prepare(model, tokenizer, recipe, names, per, data, window, n_windows, protocol,
            calibration) -> Setup:
    """``plan_units``, then the baseline's log-probabilities and static ranges (forwards)."""
    from lowbit.data import tokens
    from lowbit.eval.scoring import baseline_logprobs

    units, notes = plan_units(model, recipe, names, per)
    ids = tokens(data, tokenizer)[: window * n_windows]
    base_ppl, base_lp = baseline_logprobs(model, ids, window=window, n_windows=n_windows,
                                          protocol=protocol)
    ranges = _static_ranges(model, units, tokenizer, window, calibration)
    return Setup(per, window, n_windows, protocol, units, notes, ids, base_ppl, base_lp, ranges)


def measure_unit(model: nn.Module, setup: Setup, unit: str, members: list) -> LayerSensitivity:
    """Quantize one unit's layers alone, score the windows, put the float layers back."""
    from lowbit.eval.compare import KLAccumulator
    from lowbit.eval.perplexity_windows import perplexity

    t1 = time.perf_counter()
    swapped = [(n, m, _Simulated(m, s, setup.ranges.get(n))) for n, m, s in members]
    try:
        for n, _, sim in swapped:
            _set_module(model, n, sim)
        hook = KLAccumulator(setup.base_lp)
        res = perplexity(model, setup.ids, window=setup.window, n_windows=setup.n_windows,
                         protocol=setup.protocol, logits_hook=hook)
    finally:
        for n, original, _ in swapped:
            _set_module(model, n, original)
    rep = hook.report()
    block, index, kind = block_of(members[0][0])
    return LayerSensitivity(
        name=unit, block=block, kind=kind if setup.per == "layer" else "block", index=index,
        params=sum(m.weight.numel() for _, m, _ in members), kld_mean=rep.kld_mean,
        kld_p99=rep.kld_p99, top1_agreement=rep.top1_agreement,
        delta_ppl_pct=100 * (res.ppl / setup.base_ppl - 1), seconds=time.perf_counter() - t1)


# Ray: each unit a task (lowbit.model.distributed). A task gets the unit's name and a small
# Job; its worker loads the model by name or path once per sweep, checks it is the caller's
# (fingerprint), prepares as the serial run does and measures on the caller's torch threads,
# so the numbers equal the serial run's. A unit whose worker died twice is named in the notes.


@dataclass(frozen=True)
class Job:
    """What every task of one sweep shares (names and numbers, no tensors but the text)."""

    sweep: str
    spec: str
    fingerprint: str
    recipe: object  # a Recipe
    names: tuple[str, ...] | None
    per: str
    data: str
    window: int
    n_windows: int
    protocol: str


def _setup(job: Job, calibration):
    from lowbit.model import load_model, load_tokenizer
    from lowbit.model.distributed import fingerprint

    model = load_model(job.spec)
    if fingerprint(model) != job.fingerprint:
        raise SensitivityError(
            f"the model a Ray worker loads from {job.spec!r} differs from the caller's (changed "
            "after loading, or another file at that path on this node): pass the model as "
            "load_model returns it, and the same files on every node")
    setup = prepare(model, load_tokenizer(job.spec), job.recipe, job.names, job.per, job.data,
                    job.window, job.n_windows, job.protocol, calibration)
    return model, setup


def sensitivity_cell(unit: str, job: Job, calibration):
    """One unit, in a Ray worker: ``(LayerSensitivity, baseline PPL)``."""
    from lowbit.model.distributed import remember

    model, setup = remember(("sensitivity", job), lambda: _setup(job, calibration))
    return measure_unit(model, setup, unit, dict(setup.units)[unit]), setup.base_ppl


def sensitivity_on_ray(address: str, model, recipe, *, names: Sequence[str] | None, per: str,
                       data: str, window: int, n_windows: int, protocol: str,
                       calibration: Iterable | None, progress: bool) -> SensitivityResult:
    """``sensitivity`` with its units measured on the Ray cluster at ``address``."""
    from lowbit.model.distributed import fingerprint, run_cells, start

    t0 = time.perf_counter()
    spec = getattr(model, "lowbit_spec", None)
    if not spec or spec.startswith("<"):
        raise SensitivityError("Ray workers load the model themselves by name or path: load it "
                               "with lowbit.load_model('name or folder'), or run without --ray")
    units, notes = plan_units(model, recipe, names, per)
    job = Job(uuid.uuid4().hex, spec, fingerprint(model), recipe,
              None if names is None else tuple(names), per, str(data), window, n_windows,
              protocol)
    start(address)
    calib = None if calibration is None else list(calibration)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc=f"sensitivity per {per} on ray", unit=per,
                   leave=False, disable=None)
    found: dict[int, object] = {}
    base_ppl = [float("nan")]

    def done(i: int, result, where, error) -> None:
        if error is not None:
            notes.append(f"{units[i][0]} was not measured: its worker died ({error})")
        else:
            found[i], base_ppl[0] = result
        if bar is not None:
            bar.update(1)

    try:
        names_ = [u for u, _ in units]
        run_cells(sensitivity_cell, names_, names_, shared=(job, calib), on_done=done,
                  threads=torch.get_num_threads())
    finally:
        if bar is not None:
            bar.close()
    rows = [found[i] for i in sorted(found)]
    return SensitivityResult(recipe.name, per, window, n_windows, protocol, str(data),
                             base_ppl[0], rows, notes, time.perf_counter() - t0)


def layer_sensitivity(model: nn.Module, tokenizer, recipe, names: Sequence[str] | None = None,
                      n_windows: int = 2, **kwargs) -> dict[str, float]:
    """``{layer name: mean KL divergence}`` when only that layer is quantized with ``recipe``
    (the mixed-precision search ranks layers with it). See ``sensitivity`` for the rest."""
    kwargs.setdefault("progress", False)
    return sensitivity(model, tokenizer, recipe, names=names, n_windows=n_windows,
                       **kwargs).kld()


def _progress(items, enabled: bool, per: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"sensitivity per {per}", unit=per, leave=False, disable=None)
