"""The rows of the benchmark matrix: what they are (``BenchSettings``, ``Entry``, ``plan``) and
how one row is run (``run_entry``: the baseline, a lowbit recipe, or a peer's config), the same
way in this process and in a Ray worker (``bench_ray``). ``bench`` owns the results file.
"""

from __future__ import annotations

import copy
import shlex
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.peers import BenchError, find_config, peer_configs, peer_size, peer_status

__all__ = ["BenchError", "BenchSettings", "Entry", "command_for", "layer_errors", "plan",
           "row_head", "run_entry", "split_list"]

CALIBRATION_TOKENS = 16384  # what `lowbit eval --recipe` calibrates with (cli.common)
HF_ENGINE = "transformers.generate"


@dataclass(frozen=True)
class BenchSettings:
    model: str
    recipes: tuple[str, ...]
    peers: tuple[str, ...] = ()
    data: str = "pydoc"
    window: int = 512
    n_windows: int = 32
    protocol: str = "full"
    speed: bool = True
    threads: int | None = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def options(self) -> str:
        """The command-line options that fix the data and the metric."""
        out = (f"--data {shlex.quote(self.data)} --window {self.window} --windows "
               f"{self.n_windows} --protocol {self.protocol}")
        if self.threads:
            out += f" --threads {self.threads}"
        return out if self.speed else out + " --no-speed"


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str  # "baseline", "lowbit" or "peer"
    label: str
    nearest: str | None = None  # for peers: the lowbit recipe it compares with
    config: object = None  # PeerConfig for peers


def split_list(text) -> list[str]:
    """``"a, b,,c"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    items = [text] if isinstance(text, str) else list(text or [])
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def plan(settings: BenchSettings) -> list[Entry]:
    """The rows of the matrix, validated before anything slow runs."""
    from lowbit.model import PRESETS, Recipe

    if not settings.recipes:
        raise BenchError("no recipes to benchmark: pass at least one, e.g. --recipes w8,w4g128 "
                         f"(presets: {', '.join(PRESETS)}; peers go in --peers)")
    entries = [Entry("fp32", "baseline", "unquantized FP32 model (the baseline)")]
    peer_entries = [Entry(c.id, "peer", c.label, c.nearest, c) for c in
                    peer_configs(settings.peers)]
    for name in settings.recipes:
        config = find_config(name) if ":" in name else None
        if config is not None:
            peer_entries.insert(0, Entry(config.id, "peer", config.label, config.nearest, config))
        elif ":" in name:
            raise BenchError(f"unknown peer config {name!r}; see lowbit.eval.peers.PEERS "
                             "(e.g. torchao:int8-weight, quanto:qint4, llama.cpp:Q4_0)")
        else:
            recipe = Recipe.parse(name)
            entries.append(Entry(name, "lowbit", recipe.describe()))
    seen = {e.id for e in entries}
    for e in peer_entries:
        if e.id not in seen:
            seen.add(e.id)
            entries.append(e)
    return entries


def command_for(entry: Entry, settings: BenchSettings, report_dir: Path) -> str:
    """The command that reproduces one row's numbers."""
    model, opts = shlex.quote(settings.model), settings.options()
    if entry.kind == "baseline":
        return f"lowbit eval {model} {opts} --json"
    if entry.kind == "lowbit":
        return (f"lowbit eval {model} --recipe {shlex.quote(entry.id)} --baseline {model} "
                f"{opts} --json")
    return (f"lowbit bench {model} --recipes {shlex.quote(entry.id)} {opts} --report "
            f"{shlex.quote(str(report_dir))}")



def row_head(entry: Entry, settings: BenchSettings, out: Path) -> dict:
    """What every row starts with: which config, the command that reproduces it, where it ran."""
    from lowbit.model.distributed import node

    return {"id": entry.id, "kind": entry.kind, "label": entry.label, "nearest": entry.nearest,
            "command": command_for(entry, settings, out), "status": "ok", "node": node()}


def run_entry(entry: Entry, base, tok, ids, settings: BenchSettings, out: Path,
               note=lambda stage: None) -> dict:
    row = row_head(entry, settings, out)
    if entry.kind == "peer":
        status = peer_status(entry.config.peer)
        row["peer"], row["peer_version"] = entry.config.peer, status["version"]
        if not status["installed"]:
            row.update(status="not installed", error=f"{entry.config.peer} is not installed "
                       f"(install with: {status['install']})")
            return row
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if entry.kind == "baseline":
                row.update(_baseline_row(base, ids, settings, note))
            elif entry.kind == "lowbit":
                row.update(_recipe_row(entry, base, tok, settings, note))
            else:
                row.update(_peer_row(entry, base, tok, ids, settings, out, note))
    except Exception as exc:  # a failing config is a result, reported beside the others
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = time.perf_counter() - t0
    return row


def _eval_kwargs(settings: BenchSettings) -> dict:
    return {"data": settings.data, "window": settings.window, "n_windows": settings.n_windows,
            "protocol": settings.protocol}


def _baseline_row(base, ids, settings: BenchSettings, note) -> dict:
    from lowbit.eval.perplexity_windows import scored_range
    from lowbit.eval.scoring import baseline_logprobs, kernels_of
    from lowbit.eval.size import model_size
    from lowbit.eval.speed import measure_speed

    note(f"baseline log-probs on {settings.n_windows} windows")
    ppl, lp = baseline_logprobs(base, ids, window=settings.window, n_windows=settings.n_windows,
                                protocol=settings.protocol)
    start, stop = scored_range(settings.window, settings.protocol)
    row = {"ppl": ppl, "baseline_ppl": ppl, "delta_ppl_pct": 0.0, "kld_mean": 0.0,
           "kld_p99": 0.0, "top1_agreement": 1.0,
           "tokens_scored": len(lp.windows) * (stop - start), "kernels": kernels_of(base)}
    row.update(model_size(base).to_dict())
    if settings.speed:
        note("timing prefill and decode")
        speed = measure_speed(base, ids)
        row.update(speed.to_dict())
        # peers decode with transformers.generate: time FP32 that way too, for fair ratios
        row["decode_by_engine"] = {speed.engine: speed.decode_tok_s}
        if speed.engine != HF_ENGINE:
            row["decode_by_engine"][HF_ENGINE] = measure_speed(base, ids,
                                                               engine="hf").decode_tok_s
    return row


def _recipe_row(entry: Entry, base, tok, settings: BenchSettings, note) -> dict:
    from lowbit.data import DEFAULT_CALIBRATION, text
    from lowbit.eval.scoring import evaluate
    from lowbit.model import Recipe, quantize

    recipe = Recipe.parse(entry.id)
    calibration = (text(DEFAULT_CALIBRATION, tok, tokens=CALIBRATION_TOKENS, seq_len=512)
                   if recipe.needs_calibration else None)
    candidate = copy.deepcopy(base)
    t0 = time.perf_counter()
    note("quantizing")
    quantize(candidate, recipe, calibration, progress=False)
    note("perplexity, KLD, top-1" + (", then speed" if settings.speed else ""))
    row = {"quantize_s": time.perf_counter() - t0}
    row.update(evaluate(candidate, tok, baseline=base, speed=settings.speed,
                        **_eval_kwargs(settings)))
    row["layer_sqnr_db"] = layer_errors(base, candidate)
    return row


def _peer_row(entry: Entry, base, tok, ids, settings: BenchSettings, out: Path, note) -> dict:
    from lowbit.eval.scoring import evaluate
    from lowbit.eval.speed import measure_speed

    # (a Ray worker on another node has no report folder: its temporary folder then)
    with tempfile.TemporaryDirectory(prefix=".peer-", dir=out if out.is_dir() else None) as workdir:
        t0 = time.perf_counter()
        note("quantizing")
        candidate = entry.config.apply(copy.deepcopy(base), settings.model, Path(workdir))
        row = {"quantize_s": time.perf_counter() - t0}
        try:
            note("perplexity, KLD, top-1")
            row.update(evaluate(candidate, tok, baseline=base, speed=False,
                                **_eval_kwargs(settings)))
            size = getattr(candidate, "lowbit_size", None) or peer_size(candidate)
            row.update(size.to_dict())
            row["kernels"] = getattr(candidate, "lowbit_kernels", None) or _weight_types(candidate)
            if settings.speed:
                note("timing prefill and decode")
                speed = getattr(candidate, "speed", None)
                row.update((speed(ids) if speed else
                            measure_speed(candidate, ids, engine="hf")).to_dict())
            if not hasattr(candidate, "lowbit_size"):
                row["layer_sqnr_db"] = layer_errors(base, candidate)
        finally:
            if hasattr(candidate, "close"):
                candidate.close()
    return row


def _weight_types(model: nn.Module) -> dict[str, int]:
    """What a peer's linear layers hold, e.g. ``{"Int8Tensor weights": 211}``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            key = f"{type(m.weight).__name__} weights"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    from lowbit.nn import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        return module.dequantize_weight()
    if not isinstance(module, nn.Linear):
        return None
    w = module.weight
    if type(w) not in (torch.Tensor, nn.Parameter) and hasattr(w, "dequantize"):
        w = w.dequantize()
    return w.detach().float()


def layer_errors(base: nn.Module, candidate: nn.Module) -> dict[str, float | None]:
    """SQNR (dB) of each linear weight of ``candidate`` against ``base`` (None: identical)."""
    from lowbit.formats import sqnr_db

    reference = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    errors: dict[str, float | None] = {}
    with torch.no_grad():
        for name, module in candidate.named_modules():
            key = name.removeprefix("inner.")
            if key not in reference:
                continue
            w = _weight_of(module)
            if w is not None:
                db = sqnr_db(reference[key].detach().float(), w)
                errors[key] = round(db, 3) if db != float("inf") else None
    return errors
