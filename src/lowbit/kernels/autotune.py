"""Which kernel runs, chosen by a short measurement on first use and cached per machine.

CPU flags do not predict the winner: with native bf16 torch's one-row ``torch._int_mm``
still loses to lowbit's C GEMV (1.6 ms vs 0.6 ms at 576x49152 on an AMX Xeon), and the
float32 runtime with the fused C step decoded 1.3-2.9x faster there than the bf16 default.
So the first call that needs a choice times every decision's candidates on SmolLM2-sized
shapes (interleaved, median of several rounds, about a second in all) and writes the
result to ``<cache>/kernels.json`` (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``, written to a
temporary name and renamed), keyed by CPU model and flags, torch version, thread count and
the native library's hash; later processes read it back. ``lowbit kernels`` prints it.

Decisions and their candidates:

- ``decode.int8_weight`` / ``decode.int4_weight``: ``native`` (lowbit's C GEMV, float32
  activations) or torch's ``int8pack_mm`` / ``int4pack_mm`` (bf16 activations), few rows;
- ``decode.w8a8``: ``native``, ``int_mm`` (``torch._int_mm``) or ``fp32_gemm`` (the codes
  through a float32 GEMM);
- ``prefill.int8_weight`` / ``prefill.int4_weight``: the ``bf16`` or ``fp32`` GEMM on the
  widened weight, many rows; ``prefill.w8a8``: ``int_mm`` or ``fp32_gemm``;
- ``prefill.attention``: the float32 prefill's causal attention, ``native`` (one C call per
  block, ``kernels.prefill_attention``) or ``sdpa`` (torch's, with RoPE and cache writes);
- ``runtime.<family>`` (``int8_weight``, ``int4_weight``, ``w8a8``, ``float``): the decode
  runtime's activation dtype, ``fp32`` (fused C step where available) or ``bf16`` (torch
  step), whichever makes a whole decode step fastest (``runtime.probe`` times one block);
- ``compute``: ``compute_dtype: auto``'s dtype, the majority of the quantized
  ``runtime.*`` choices.

A probe run on a busy machine (a winner's median over twice its best run, or a load average
above 1.5 per core) keeps only clear wins (runner-up 1.5x slower), takes the flag-based
choice for the rest, and is measured again by the next process.

Every path computes the same numbers it did before; only which one runs is chosen.
Overrides: ``assume_cpu`` / ``LOWBIT_CPU`` choose by CPU flags instead of measuring (tests),
``native.force`` / ``LOWBIT_NATIVE`` switch the native kernels, ``forcing`` fixes choices
in a block.

Layering: the per-call lookup (``DECISIONS``, ``choice``, ``forcing`` ...) lives in
``kernels.choices``, below the wrappers, and is re-exported here; this module keeps the
cache and the timing, and gets the measurement (``kernels.probe``, which runs the wrappers)
through ``register_kernel_probe``, so no kernel module imports another in a circle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.kernels import choices, native
from lowbit.kernels.choices import (  # noqa: F401  (re-exported: the choices' public face)
    DECISIONS,
    by_flags,
    choice,
    flag_ranking,
    float_dtype,
    forcing,
    native_preferred,
    ranking,
)

CACHE_NAME = "kernels.json"
VERSION = 3  # of the probe: a new version measures again
#: environment variables that cap the instruction sets torch and oneDNN use
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_result: dict | None = None
_lock = threading.RLock()
_kernel_probe: Callable[[], dict] | None = None
_step_probe = None


def register_kernel_probe(measure: Callable[[], dict]) -> None:
    """``kernels/__init__`` hands in ``probe.measure``: the probe runs the wrappers, which
    consult these choices, so this module never imports it."""
    global _kernel_probe
    _kernel_probe = measure


def register_step_probe(make_candidates) -> None:
    """The runtime layer hands in its step probe (``runtime.probe.step_candidates``): kernels
    never import the runtime, so ``runtime.*`` decisions are measured once it is loaded and
    follow the CPU flags until then."""
    global _step_probe
    _step_probe = make_candidates


def step_probe():
    return _step_probe


# ---- the cache ------------------------------------------------------------------------------
def cache_path() -> Path:
    return native.cache_root() / CACHE_NAME


def machine_key() -> dict:
    """What the timings depend on: CPU model and flags, torch (and the instruction sets its
    environment allows it), threads, native library."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            info.setdefault(name.strip(), value.strip())
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = info.get("flags") or info.get("Features") or ""
    lib = native.library_tag() if native.available() else f"none ({native.why_unavailable()})"
    return {"cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
            "native": lib, "probe": VERSION}


def _key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(entry) -> bool:
    """A complete entry measured on a quiet machine (a noisy one is measured again)."""
    try:
        if _step_probe is not None and not entry.get("runtime_measured", False):
            return False  # measured before the runtime's probe was registered
        return not entry["noisy"] and all(entry["ranking"][n][0] in c
                                          for n, c in DECISIONS.items())
    except (AttributeError, KeyError, IndexError, TypeError):
        return False


def _write(path: Path, entries: dict) -> None:
    """Atomically: a temporary file in the same folder, renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def measured(remeasure: bool = False) -> dict:
    """This machine's entry: ``key``, ``ranking`` (per decision, fastest first), ``table``
    (microseconds per candidate and shape), ``seconds`` (the probe's own time) and
    ``cached`` (read back rather than measured in this process)."""
    global _result
    if _result is not None and not remeasure:
        return _result
    with _lock:
        if _result is not None and not remeasure:
            return _result
        key = machine_key()
        kid, path = _key_id(key), cache_path()
        entries = _read(path)
        entry = entries.get(kid)
        if remeasure or not _valid(entry):
            if _kernel_probe is None:
                raise RuntimeError("no kernel probe registered (import lowbit.kernels)")
            entry = {"key": key, **_kernel_probe()}
            entries = {k: v for k, v in entries.items() if _valid(v) and k != kid}
            entries[kid] = entry
            try:
                _write(path, entries)
            except OSError:  # a read-only cache still gets this process's choices
                pass
            _result = {**entry, "cached": False}
        else:
            _result = {**entry, "cached": True}
        return _result


choices.register_measured(measured)  # the per-call lookup reads the ranking through it


def reset() -> None:
    """Forget this process's choices (the cache file stays): tests, ``--remeasure``."""
    global _result
    with _lock:
        _result = None


def bench(candidates: dict, rounds: int = 7, number: int = 1, noise: list | None = None,
          deadline: float | None = None) -> dict[str, float]:
    """Median microseconds per call of each candidate (``name -> f``, ``f(n)`` making ``n``
    calls), timed interleaved: each round runs every candidate ``number`` times. A candidate
    slower than 4x the best after 3 rounds stops there (its median so far stands). ``noise``
    gets the fastest candidate's median / minimum (near 1 on an idle machine). Past
    ``deadline`` (``time.perf_counter``) rounds make one call each and stop after the third
    (only a busy machine gets there)."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    live = dict(candidates)
    for f in candidates.values():
        f(1)  # warm-up
    for r in range(rounds):
        late = deadline is not None and time.perf_counter() > deadline
        n = 1 if late else number
        for name, f in live.items():
            t0 = time.perf_counter()
            f(n)
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
        if r == 2 and late:
            break
        if r == 2:
            best = min(statistics.median(s) for s in samples.values())
            live = {n: f for n, f in live.items() if statistics.median(samples[n]) < 4 * best}
    medians = {name: statistics.median(s) for name, s in samples.items()}
    if noise is not None:
        best = min(medians, key=medians.get)
        noise.append(medians[best] / min(samples[best]))
    return {name: round(t, 2) for name, t in medians.items()}
