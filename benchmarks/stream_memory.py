"""Streaming quantization: peak memory and time against model size (issue 22).

Writes synthetic checkpoints (random weights, one shard per block, ``tests/model/synthetic``)
of several sizes with the same block shape, quantizes each with ``lowbit.quantize_checkpoint``
in a fresh process (``tests/model/capped_run``: a one-block warm-up of the same shapes
first, then the kernel's exact peak resident set, ``VmHWM``, reset before the run) and
reports the peak growth, the seconds and the seconds per million parameters. Streaming
holds one block, so the peak should stay flat while the model grows; the time should grow
in proportion to the parameters.

Run (from the repository root):
  .venv/bin/python benchmarks/stream_memory.py                       # (a) RTN, 0.5 / 1 / 2 GB
  .venv/bin/python benchmarks/stream_memory.py --preset time         # (b) w4g128-gptq, heads
Each writes ``docs/stream_<preset>.json`` (``--out`` to change it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (name, hidden, intermediate, layers, vocab, family, tied)
PRESETS = {
    # (a) 50 MiB blocks (hidden 1024, intermediate 2816): 0.5, 1 and 2 GB of FP32 weights
    "memory": ("w4g128", 0, [("llama-10L", 1024, 2816, 10, 32000, "llama", False),
                             ("llama-20L", 1024, 2816, 20, 32000, "llama", False),
                             ("llama-40L", 1024, 2816, 40, 32000, "llama", False)]),
    # (b) GPTQ on three sizes, the last with a Qwen2-sized vocabulary (151,936 rows, tied)
    "time": ("w4g128-gptq", 8192, [("llama-4L", 512, 1408, 4, 32000, "llama", False),
                                   ("llama-8L", 512, 1408, 8, 32000, "llama", False),
                                   ("qwen2-8L-151936", 512, 1408, 8, 151936, "qwen2",
                                    True)]),
}


def _run(folder: Path, warm: Path, recipe: str, tokens: int) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    cmd = [sys.executable, "-m", "tests.model.capped_run", "stream", str(folder),
           str(folder) + "-q", str(warm), "1000000", recipe, str(tokens)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="memory")
    p.add_argument("--sizes", type=int, default=None, help="only the first N sizes")
    p.add_argument("--tmp", default=None, help="folder for the synthetic checkpoints")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from lowbit.kernels.cpu import cpu_line
    from tests.model.synthetic import llama_config, write_checkpoint

    recipe, tokens, sizes = PRESETS[args.preset]
    sizes = sizes[: args.sizes] if args.sizes else sizes
    command = " ".join(["python", "benchmarks/stream_memory.py"] + sys.argv[1:])
    print(f"cpu: {cpu_line()}\ncommand: {command}")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-stream-", dir=args.tmp))
    try:
        for name, hidden, inter, layers, vocab, family, tie in sizes:
            shape = dict(hidden=hidden, inter=inter, vocab=vocab, family=family, tie=tie,
                         heads=8 if hidden % 8 == 0 else 14, kv_heads=2)
            folder, warm = tmp / name, tmp / f"{name}-warm"
            nbytes = write_checkpoint(folder, llama_config(layers=layers, **shape))
            write_checkpoint(warm, llama_config(layers=1, **shape))
            r = _run(folder, warm, recipe, tokens)
            if r["error"]:
                raise SystemExit(f"{name}: {r['error']}")
            params = nbytes / 4 / 1e6
            row = {"model": name, "layers": layers, "hidden": hidden, "intermediate": inter,
                   "vocab": vocab, "tied": tie, "fp32_gb": nbytes / 1e9, "mparams": params,
                   "peak_growth_mib": r["peak_growth_mb"], "seconds": r["seconds"],
                   "s_per_mparam": r["seconds"] / params}
            rows.append(row)
            print(f"{name:18s} {nbytes / 1e9:5.2f} GB FP32  {params:7.1f} M params  peak +"
                  f"{r['peak_growth_mb']:7.1f} MiB  {r['seconds']:7.1f} s  "
                  f"{row['s_per_mparam']:.3f} s/M", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(str(folder) + "-q", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out or ROOT / "docs" / f"stream_{args.preset}.json")
    out.write_text(json.dumps({"cpu": cpu_line(), "command": command, "recipe": recipe,
                               "calibration_tokens": tokens, "threads": os.cpu_count(),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
