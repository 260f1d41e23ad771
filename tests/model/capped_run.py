"""Quantize a checkpoint in a process whose memory is capped, and report its peak.

``python -m tests.model.capped_run MODE SRC OUT WARM CAP_MB RECIPE [TOKENS]`` (run from the
repository root). MODE ``stream`` runs ``lowbit.quantize_checkpoint``; ``memory`` runs the
in-memory path (``load_model``, ``quantize``, ``save``). First the same path runs on WARM
(a one-block checkpoint of the same shapes), so kernels are compiled and measured, threads
started and libraries loaded before the cap; then:

- the cap: ``RLIMIT_AS`` set to the address space in use plus CAP_MB. It counts virtual
  memory, so it binds on every allocation, mapped file or thread stack: nothing can grow
  past it, unlike a resident-set check after the fact (the in-memory path under the same
  cap must fail, which shows the cap binds). glibc keeps one malloc arena
  (``MALLOC_ARENA_MAX=1``, set by the caller) so no thread reserves a 64 MiB arena of
  address space it never touches;
- the measurement: the kernel's own peak resident set (``VmHWM``), reset just before
  (``/proc/self/clear_refs``), minus the resident set then: the growth, exactly, without
  sampling.

Prints one JSON line: ``peak_growth_mb``, ``seconds``, ``error`` (None on success).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _calibration(tokens: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 512), generator=g) for _ in range(tokens // 512)]


def _quantize(mode: str, src: str, out: str, recipe: str, calib) -> None:
    import lowbit as lb

    if mode == "stream":
        lb.quantize_checkpoint(src, recipe, out, calib, progress=False, overwrite=True)
    else:
        model = lb.load_model(src)
        lb.quantize(model, recipe, calib, progress=False)
        lb.save(model, out, overwrite=True)


def main(argv: list[str]) -> int:
    mode, src, out, warm, cap_mb, recipe = argv[:6]
    tokens = int(argv[6]) if len(argv) > 6 else 0
    import torch  # noqa: F401  (loaded before the cap)
    from transformers import AutoConfig

    import lowbit  # noqa: F401

    vocab = AutoConfig.from_pretrained(src).vocab_size
    calib = _calibration(tokens, vocab) if tokens else None
    _quantize(mode, warm, out + ".warm", recipe, calib)
    limit = _status("VmSize") + int(float(cap_mb) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _status("VmRSS")
    t0 = time.perf_counter()
    error = None
    try:
        _quantize(mode, src, out, recipe, calib)
    except (MemoryError, RuntimeError, OSError) as exc:  # an allocation the cap refused
        error = f"{type(exc).__name__}: {str(exc)[:600]}"
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which decides
        error = f"{type(exc).__name__}: {str(exc)[:600]}"
    print(json.dumps({"mode": mode, "peak_growth_mb": (_status("VmHWM") - start) / 2**20,
                      "seconds": time.perf_counter() - t0, "cap_mb": float(cap_mb),
                      "error": error}))
    return 0 if error is None else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
