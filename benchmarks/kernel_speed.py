"""Per-call latency of lowbit's kernel wrappers beside FP32 and BF16 ``F.linear``.

For each shape (M x K x N: decode MLP up/down, decode output head, prefill) it times, in one
process, interleaved round by round so that machine noise hits every column alike:
- ``fp32``: ``F.linear`` on float32; ``bf16``: ``F.linear`` with x and W already bf16;
- lowbit's fast paths, called exactly as a float32 model calls them (float32 x in, float32
  out, casts/padding/activation quantization included): ``int8_weight``, ``int4 g32``,
  ``int4 g128`` (K = 576 is padded to 640), ``w8a8 dynamic``, ``w8a8 static``,
  ``integer-only`` (int8 codes in and out);
- ``int8_weight native`` / ``torch`` and ``int4 g128 native`` / ``torch`` (decode shapes):
  lowbit's AVX2 loop (``kernels/native.py``) and torch's bf16 kernel, each forced; and
  ``w8a8 dynamic native`` / ``int_mm`` / ``fp32_gemm``, the three W8A8 decode paths;
- with ``--raw``: the bare aten ops on prepared bf16/int8 inputs, to show wrapper overhead;
- with ``--alternatives``: other CPU int8 paths torch ships (fbgemm ``quantize_dynamic``,
  oneDNN ``qlinear_pointwise``, FP16 ``F.linear``) for the decode question;
- with ``--overhead``: per-call Python overhead of each wrapper on a 1x64x64 layer (where
  the matmul itself costs ~nothing), beside the bare aten kernel op alone.
Each cell is the per-call time in microseconds over all rounds (after a warm-up), as the
median and, in a second table, the 10th percentile (on a shared host the low percentile is
the better estimate of an idle machine); ``x`` is FP32 / cell (above 1: faster than FP32).

Run: .venv/bin/python benchmarks/kernel_speed.py [--rounds 5] [--calls 10] [--threads 2] [--raw]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit import kernels as K

SHAPES = [(1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (512, 576, 1536)]


def _int4_state(w: torch.Tensor, group: int) -> K.Int4WeightState:
    n, k = w.shape
    rows = F.pad(w, (0, (-k) % group)).reshape(n, -1, group)
    lo, hi = rows.amin(-1).clamp(max=0), rows.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zp = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(rows / scale[..., None] + zp[..., None]).clamp(0, 15)
    q = q.reshape(n, -1)[:, :k].to(torch.uint8)
    return K.prepare_int4_weight(q, scale, zp.to(torch.uint8), group_size=group)


def _candidates(m: int, k: int, n: int, raw: bool, alternatives: bool) -> dict[str, Callable]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    w_scale = w.abs().amax(1) / 127
    q8 = torch.round(w / w_scale[:, None]).to(torch.int8)
    s8 = K.prepare_int8_weight(q8, w_scale)
    s4 = {gs: _int4_state(w, gs) for gs in (32, 128)}
    dyn = K.prepare_int8_dynamic(q8, w_scale)
    act_scale = float(x.abs().max()) / 127
    stat = K.prepare_int8_static(q8, w_scale, act_scale)
    qx = K.quantize_per_tensor(x, act_scale)
    y_scale = float((x @ w.T).abs().max()) / 127
    integ = K.prepare_integer_linear(q8, w_scale, x_scale=act_scale, x_zero_point=0,
                                     y_scale=y_scale, y_zero_point=0)
    c: dict[str, Callable] = {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "int8_weight": lambda: K.int8_weight_linear(x, s8),
        "int4 g32": lambda: K.int4_weight_linear(x, s4[32]),
        "int4 g128": lambda: K.int4_weight_linear(x, s4[128]),
        "w8a8 dynamic": lambda: K.int8_dynamic_linear(x, dyn),
        "w8a8 static": lambda: K.int8_static_linear(x, stat),
        "integer-only": lambda: K.integer_linear(qx, integ),
    }
    if m < K.native.MAX_ROWS and K.native.available():  # decode: lowbit's loop vs torch's
        for name, fn in (("int8_weight", lambda: K.int8_weight_linear(x, s8)),
                         ("int4 g128", lambda: K.int4_weight_linear(x, s4[128]))):
            c[f"{name} native"] = _forced(fn, True)
            c[f"{name} torch"] = _forced(fn, False)
        for path in ("native", "int_mm", "fp32_gemm"):  # the three exact W8A8 decode paths
            c[f"w8a8 dynamic {path}"] = _forced(lambda: K.int8_dynamic_linear(x, dyn),
                                                path == "native", {"decode.w8a8": path})
    if raw:
        op8 = torch.ops.aten._weight_int8pack_mm.default
        op4 = torch.ops.aten._weight_int4pack_mm_for_cpu.default
        xb4 = {gs: F.pad(xb, (0, s4[gs].k_padding)) for gs in (32, 128)}
        c["raw int8pack_mm bf16"] = lambda: op8(xb, s8.qdata, s8.kernel_scale)
        c["raw int8pack_mm fp32"] = lambda: op8(x, s8.qdata, s8.scale)
        c["raw int4pack_mm g32 bf16"] = lambda: op4(
            xb4[32], s4[32].packed, 32, s4[32].scales_and_zeros)
        c["raw _int_mm"] = lambda: torch._int_mm(qx, q8.T)
        c["raw to(bf16) + int8pack_mm + mul(fp32 scale)"] = lambda: torch.mul(
            op8(x.to(torch.bfloat16), s8.qdata, s8.unit_scale), s8.scale)
    if alternatives:
        c.update(_alternatives(x, w, q8, w_scale, act_scale))
    return c


def _forced(fn: Callable, native: bool, choices: dict | None = None) -> Callable:
    def run():
        with K.native.force(native), K.autotune.forcing(choices or {}):
            return fn()
    return run


def _alternatives(x, w, q8, w_scale, act_scale) -> dict[str, Callable]:
    """Other int8 CPU paths in torch 2.13, for the decode comparison (not used by lowbit)."""
    out: dict[str, Callable] = {}
    xh, wh = x.half(), w.half()
    out["alt fp16 F.linear"] = lambda: F.linear(xh, wh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        qlin = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    out["alt fbgemm dynamic (fp32 x)"] = lambda: qlin(x)
    try:
        packed = torch.ops.onednn.qlinear_prepack(q8, list(x.shape))
        xu8 = (K.quantize_per_tensor(x, act_scale).int() + 128).to(torch.uint8)
        zeros = torch.zeros(w.shape[0], dtype=torch.int64)
        out["alt onednn qlinear (u8 x)"] = lambda: torch.ops.onednn.qlinear_pointwise(
            xu8, act_scale, 128, packed, w_scale, zeros, None, 1.0, 0, torch.float32,
            "none", [], "")
        out["alt onednn qlinear (u8 x)"]()
    except (RuntimeError, AttributeError) as exc:  # not in every build
        print(f"# onednn qlinear unavailable: {exc}")
        out.pop("alt onednn qlinear (u8 x)", None)
    return out


def _stat(samples: list[float], stat: str) -> float:
    if stat == "median":
        return statistics.median(samples)
    return sorted(samples)[len(samples) // 10]  # p10: what a quieter machine would see


def _time(
    fns: dict[str, Callable], rounds: int, calls: int, clock: Callable = time.perf_counter
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up (allocator, oneDNN primitive caches, layout probe)
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(calls):
                    t0 = clock()
                    fn()
                    samples[name].append(clock() - t0)
    return {name: [t * 1e6 for t in s] for name, s in samples.items()}


def _overhead(rounds: int, clock: Callable[[], float]) -> None:
    """Wrapper vs bare kernel op on a tiny decode layer: the difference is wrapper cost
    (checks, casts, padding, rescale), the number a decode step pays per linear."""
    m, k, n = 1, 64, 64
    fns = _candidates(m, k, n, raw=True, alternatives=False)
    res = _time(fns, rounds, 200, clock)
    print(f"# per-call time at {m}x{k}x{n} (kernel work ~0): wrapper overhead")
    print("| call | median | p10 |\n|---|---|---|")
    for name, us in res.items():
        print(f"| {name} | {_stat(us, 'median'):.1f} us | {_stat(us, 'p10'):.1f} us |")


def _table(samples: dict[tuple[int, int, int], dict[str, list[float]]], stat: str) -> str:
    results = {s: {name: _stat(v, stat) for name, v in r.items()} for s, r in samples.items()}
    shapes = list(results)
    names = list(results[shapes[0]])
    head = "| kernel | " + " | ".join(f"{m}x{k}x{n}" for m, k, n in shapes) + " |"
    lines = [head, "|---" * (len(shapes) + 1) + "|"]
    for name in names:
        cells = []
        for s in shapes:
            us, base = results[s].get(name), results[s]["fp32"]
            cells.append("—" if us is None else f"{us:,.0f} us ({base / us:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--raw", action="store_true", help="also time the bare aten ops")
    parser.add_argument("--overhead", action="store_true", help="per-call wrapper overhead")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time (needs --threads 1); robust to other "
                        "jobs on a shared host, blind to waiting")
    parser.add_argument("--alternatives", action="store_true",
                        help="also time torch's other int8 CPU paths (fbgemm, oneDNN, fp16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.rounds} rounds x {args.calls} "
          f"calls per candidate, interleaved, {args.clock} clock; (Nx) = FP32 time / this time")
    if args.overhead:
        _overhead(args.rounds, clock)
        return
    results = {}
    for m, k, n in SHAPES:
        fns = _candidates(m, k, n, args.raw, args.alternatives)
        calls = max(2, args.calls // 4) if m * k * n > 2e8 else args.calls
        results[(m, k, n)] = _time(fns, args.rounds, calls, clock)
        print(f"# {m}x{k}x{n} done", flush=True)
    print(f"\n## median\n{_table(results, 'median')}")
    print(f"\n## p10 (10th percentile: closer to an idle machine when the host is shared)\n"
          f"{_table(results, 'p10')}")


if __name__ == "__main__":
    main()
