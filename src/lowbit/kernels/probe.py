"""``autotune``'s measurement: every decision's candidates run through the real wrappers
(``int8_weight_linear`` ...), each forced to one path, on SmolLM2-sized shapes.

Decode: one row through ``576 -> 1536``, ``1536 -> 576`` and ``576 -> 16384`` (a wide
output head, where one-row ``torch._int_mm`` falls behind), ranked by a SmolLM2-135M-like
mix: 30 blocks of twice the first two shapes (q/k/v/o/gate/up/down hold that many weights)
and a head of three times the third. Prefill: 128 rows through ``576 -> 1536``, and causal
attention of 128 tokens over SmolLM2's heads. The
runtime's activation dtype: one synthetic block's decode step in float32 and in bf16
(``runtime.probe``); a model's step is estimated as 30 times that block's work besides its
float linears plus the mix of the family's measured GEMVs in that dtype.

``autotune`` never imports this module (it runs the wrappers, which consult ``choices``):
``kernels/__init__`` registers ``measure`` with ``autotune.register_kernel_probe``.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F

from lowbit.formats.rotation import hadamard_factors, rotate
from lowbit.kernels import autotune, choices, native
from lowbit.kernels import int4_weight as k4
from lowbit.kernels import int8_dynamic as k8a8
from lowbit.kernels import int8_weight as k8
from lowbit.kernels import prefill_attention as pa
from lowbit.kernels.int4_weight import int4_weight_linear, prepare_int4_weight
from lowbit.kernels.int8_dynamic import int8_dynamic_linear, prepare_int8_dynamic
from lowbit.kernels.int8_weight import int8_weight_linear, prepare_int8_weight

#: (K, N, how many of it a SmolLM2-135M-like decode step runs)
DECODE_SHAPES = ((576, 1536, 60), (1536, 576, 60), (576, 16384, 3))
BLOCKS = 30
PREFILL_ROWS = 128
#: a winner whose median is this many times its fastest run was timed on a busy machine:
#: its choices are used by this process but measured again by the next
NOISY = 2.0
#: the same where the load average per core exceeds this (the probe's own threads count 1)
BUSY = 1.5
#: on a noisy run a decision keeps its measured winner only when the runner-up is this much
#: slower; closer calls take the choice by CPU flags (``autotune.by_flags``'s policy)
MARGIN = 1.5
#: past this many seconds every timing stops at 3 rounds (only a busy machine gets there)
BUDGET_S = 2.0
_BASE = {name: cands[-1] for name, cands in choices.DECISIONS.items()}


def _label(rows: int, k: int, n: int) -> str:
    return f"{rows}x{k}x{n}"


def _under(fn, native_on: bool | None = None, **fixed):
    """``f(n)``: ``n`` calls of ``fn`` with the native kernels forced and choices fixed."""

    def f(n: int) -> None:
        forced = native.force(native_on) if native_on is not None else contextlib.nullcontext()
        with forced, choices.forcing(fixed):
            for _ in range(n):
                fn()

    return f


def _layers(k: int, n: int, gen: torch.Generator) -> dict:
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    nib = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s4 = torch.rand(n, -(-k // 128), generator=gen) * 0.01 + 1e-3
    return {"int8": prepare_int8_weight(codes, scale),
            "int4": prepare_int4_weight(nib, s4, group_size=128),
            "w8a8": prepare_int8_dynamic(codes, scale),
            "w32": torch.randn(n, k, generator=gen), "w16": torch.randn(n, k).bfloat16()}


def _prebound(make, *args):
    """The runtime's native decode call (``decode_callable``), or None where it has none."""
    with native.force(True):
        return make(*args) if native.available() else None


def _decode(table: dict, k: int, n: int, layer: dict, gen: torch.Generator,
            noise: list, deadline: float) -> None:
    """Native candidates as the runtime calls them (prebound), torch's through the wrappers
    as a module's forward does; W8A8 with the Hadamard input rotation of its preset."""
    x32 = torch.randn(1, k, generator=gen)
    x16 = x32.bfloat16()
    i8, i4, w8a8 = layer["int8"], layer["int4"], layer["w8a8"]
    f8 = _prebound(k8.decode_callable, i8, None)
    f4 = _prebound(k4.decode_callable, i4, None)
    fa = _prebound(k8a8.decode_callable, w8a8, None, hadamard_factors(k))
    runs = {
        "decode.int8_weight": {
            "native": f8 and _under(lambda: f8(x32)),
            "int8pack_mm": _under(lambda: int8_weight_linear(x16, i8), False)},
        "decode.int4_weight": {
            "native": f4 and _under(lambda: f4(x32)),
            "int4pack_mm": _under(lambda: int4_weight_linear(x16, i4), False)},
        "decode.w8a8": {
            "native": fa and _under(lambda: fa(x32)),
            "int_mm": _under(lambda: int8_dynamic_linear(rotate(x32), w8a8), False,
                             **{"decode.w8a8": "int_mm"}),
            "fp32_gemm": _under(lambda: int8_dynamic_linear(rotate(x32), w8a8), False,
                                **{"decode.w8a8": "fp32_gemm"})},
        "decode.float": {"fp32": _under(lambda: F.linear(x32, layer["w32"])),
                         "bf16": _under(lambda: F.linear(x16, layer["w16"]))},
    }
    for name, cands in runs.items():
        times = autotune.bench({c: f for c, f in cands.items() if f}, number=4, noise=noise,
                               deadline=deadline)
        for c, us in times.items():
            table.setdefault(name, {}).setdefault(c, {})[_label(1, k, n)] = us


def _prefill(table: dict, k: int, n: int, layer: dict, gen: torch.Generator,
             noise: list, deadline: float) -> None:
    x = torch.randn(PREFILL_ROWS, k, generator=gen)
    i8, i4, w8a8 = layer["int8"], layer["int4"], layer["w8a8"]
    runs = {}
    for dt in ("bf16", "fp32"):
        runs.setdefault("prefill.int8_weight", {})[dt] = _under(
            lambda: int8_weight_linear(x, i8), **{"prefill.int8_weight": dt})
        runs.setdefault("prefill.int4_weight", {})[dt] = _under(
            lambda: int4_weight_linear(x, i4), **{"prefill.int4_weight": dt})
    runs["prefill.w8a8"] = {c: _under(lambda: int8_dynamic_linear(x, w8a8),
                                      **{"prefill.w8a8": c}) for c in ("int_mm", "fp32_gemm")}
    runs["prefill.attention"] = _attention(gen)
    for name, cands in runs.items():
        label = (f"{PREFILL_ROWS} tokens, 9 / 3 heads" if name == "prefill.attention"
                 else _label(PREFILL_ROWS, k, n))
        for c, us in autotune.bench(cands, rounds=5, noise=noise, deadline=deadline).items():
            table.setdefault(name, {}).setdefault(c, {})[label] = us


def _attention(gen: torch.Generator) -> dict:
    """``prefill.attention``'s candidates on SmolLM2's heads (9 query, 3 kv, 64 wide)."""
    heads, kv_heads, dim, rows = 9, 3, 64, PREFILL_ROWS
    q = torch.randn(1, rows, heads * dim, generator=gen)
    k, v = (torch.randn(1, rows, kv_heads * dim, generator=gen) for _ in range(2))
    cos, sin = torch.rand(rows, dim, generator=gen), torch.rand(rows, dim, generator=gen)
    kc, vc = torch.zeros(1, kv_heads, rows, dim), torch.zeros(1, kv_heads, rows, dim)
    args = (q, k, v, cos, sin, kc, vc, dim**-0.5, heads)
    runs = {"sdpa": _under(lambda: pa.attend_torch(*args))}
    if pa.supported(dim, heads, kv_heads):
        runs["native"] = _under(lambda: pa.attend(*args))
    return runs


def total(table: dict, name: str, cand: str) -> float:
    """The decode mix's time of ``cand`` (decode decisions), or its one prefill time."""
    times = table[name][cand]
    if not name.startswith("decode."):
        return sum(times.values())
    return sum(count * times[_label(1, k, n)] for k, n, count in DECODE_SHAPES)


def _runtime(table: dict, noise: list, deadline: float) -> None:
    """``runtime.<family>``: the estimated block step (see the module docstring)."""
    steps = autotune.bench(autotune.step_probe()(), rounds=7, number=2, noise=noise,
                           deadline=deadline)
    table["runtime.step"] = {dt: {"1 block": us} for dt, us in steps.items()}
    # the block's work besides its float linears (2 x the first two shapes), times 30
    rest = {dt: BLOCKS * (steps[dt] - 2 * sum(table["decode.float"][dt][_label(1, k, n)]
                                              for k, n, _ in DECODE_SHAPES[:2]))
            for dt in steps}
    fams = {"float": ("decode.float", "fp32", "bf16"),
            "int8_weight": ("decode.int8_weight", "native", "int8pack_mm"),
            "int4_weight": ("decode.int4_weight", "native", "int4pack_mm")}
    for fam, (name, fp32, bf16) in fams.items():
        if fp32 not in table[name]:  # no native GEMV: torch's kernel either way
            fp32 = bf16
        lin = {"fp32": total(table, name, fp32), "bf16": total(table, name, bf16)}
        table[f"runtime.{fam}"] = {dt: {"step (est.)": round(rest[dt] + lin[dt], 1)}
                                   for dt in ("fp32", "bf16")}
    best_w8a8 = min(total(table, "decode.w8a8", c) for c in table["decode.w8a8"])
    table["runtime.w8a8"] = {dt: {"step (est.)": round(rest[dt] + best_w8a8, 1)}
                             for dt in ("fp32", "bf16")}


def measure() -> dict:
    """``{"ranking": ..., "table": ..., "seconds": ...}`` for ``autotune``'s cache."""
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S
    gen = torch.Generator().manual_seed(0)
    table: dict = {}
    noise: list[float] = []
    runtime_measured = autotune.step_probe() is not None
    token = native._forced.set(None)  # the caller's native.force must not leak in
    try:
        with choices.forcing(_BASE), torch.inference_mode():
            for k, n, _ in DECODE_SHAPES:
                layer = _layers(k, n, gen)
                _decode(table, k, n, layer, gen, noise, deadline)
                if (k, n) == DECODE_SHAPES[0][:2]:
                    _prefill(table, k, n, layer, gen, noise, deadline)
                del layer
            if runtime_measured:
                _runtime(table, noise, deadline)
    finally:
        native._forced.reset(token)
    worst = max(noise)  # the winners' median / minimum: near 1 on an idle machine
    load = busy()
    noisy = worst > NOISY or load > BUSY
    ranking = {}
    for name, cands in choices.DECISIONS.items():
        if name == "compute":
            continue
        if name not in table:  # runtime.* before the runtime registered its probe
            ranking[name] = choices.flag_ranking(name)
            continue
        timed = sorted(table[name], key=lambda c: total(table, name, c))
        ranking[name] = timed + [c for c in cands if c not in timed]
        # a win is clear when the runner-up takes MARGIN x as long; an estimate at or below
        # zero (runtime.*: a step minus its linears, on a noisy machine) decides nothing
        top = [total(table, name, c) for c in timed[:2]]
        clear = len(top) == 2 and top[0] > 0 and top[1] >= MARGIN * top[0]
        if noisy and not clear:
            ranking[name] = choices.flag_ranking(name)  # too close to call on a busy machine
    votes = [ranking[f"runtime.{f}"][0] for f in ("int8_weight", "int4_weight", "w8a8")]
    ranking["compute"] = sorted(("fp32", "bf16"), key=lambda dt: -votes.count(dt))
    return {"ranking": ranking, "table": table, "noise": round(worst, 2), "load": load,
            "noisy": noisy, "runtime_measured": runtime_measured,
            "seconds": round(time.perf_counter() - t0, 3)}


def busy() -> float:
    """The 1-minute load average per core this process may use (0 where unknown): above
    ``BUSY`` other work competes for the cores, and every sample can be stalled alike."""
    try:
        return round(os.getloadavg()[0] / len(os.sched_getaffinity(0)), 2)
    except (AttributeError, OSError):
        return 0.0
