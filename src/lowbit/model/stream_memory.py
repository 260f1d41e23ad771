"""How much memory quantization needs, in memory or one block at a time, against a cap.

``--max-memory`` (default: what the machine has available) decides whether ``lowbit
quantize`` loads the whole model or streams it (``stream_quantize``), and refuses a cap too
small for one block with the amount one block needs. The estimates are deliberately simple,
measured on this code (``benchmarks/stream_memory.py``):

- in memory: the FP32 weights x 1.5 (the calibrated path peaked at 1.37-1.47x the FP32
  model on SmolLM2-135M, ``calib_memory.REBATCH_TOKENS``) plus the held calibration inputs;
- streaming: the process itself (its resident set when the run starts: interpreter, torch,
  transformers), the largest unit's FP32 weights x 3 (the weights, the solver's copies and
  the packed result; x 4 with GPTAQ's float copy of the block), the held calibration inputs
  (``tokens x hidden`` in float16, twice with GPTAQ) and one forward's activations.
"""

from __future__ import annotations

import re
from pathlib import Path

from lowbit.errors import LowbitError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class MemoryCapError(LowbitError, ValueError):
    """A memory cap that cannot be met, or cannot be read; the message names the fix."""


def parse_size(text: str | int) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1.5g"`` or a number of bytes, as bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise MemoryCapError(f"cannot read the memory size {text!r}: write a positive number "
                             "with a unit, e.g. 8GiB, 512MiB or 16GB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _proc_bytes(file: str, key: str) -> int | None:
    """``key``'s value (given in kB) in a ``/proc`` status file, in bytes; None if absent."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """What the machine can give this process now (``MemAvailable``), else its total."""
    found = _proc_bytes("/proc/meminfo", "MemAvailable")
    if found is not None:
        return found
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident set size now."""
    found = _proc_bytes("/proc/self/status", "VmRSS")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_inputs_bytes(tokens: int, hidden: int, float_path: bool) -> int:
    """Calibration's stored block inputs: ``tokens x hidden`` in float16 (x2 for GPTAQ)."""
    return tokens * hidden * 2 * (2 if float_path else 1)


def in_memory_need(weights_fp32: int, held: int) -> int:
    """Peak memory of quantizing the whole model in memory (module docstring)."""
    return int(1.5 * weights_fp32) + held


def forward_bytes(batch_tokens: int, widest: int) -> int:
    """One calibration forward's activations: a few ``batch x widest`` float32 buffers."""
    return 6 * batch_tokens * widest * 4


def streaming_need(base: int, largest_unit: int, held: int, forward: int,
                   float_copy: bool) -> int:
    """Peak memory of streaming (module docstring)."""
    return base + (4 if float_copy else 3) * largest_unit + held + forward


def check_cap(cap: int, need: int, unit_name: str, parts: dict[str, int]) -> None:
    """Refuse a cap below what one unit needs, naming the amount and what makes it up."""
    if need <= cap:
        return
    detail = ", ".join(f"{k} {format_size(v)}" for k, v in parts.items())
    raise MemoryCapError(
        f"--max-memory {format_size(cap)} is too small: one block ({unit_name}) needs about "
        f"{format_size(need)} ({detail}); raise --max-memory to at least {format_size(need)}, "
        "or pass fewer --calibration-tokens")


def folder_need(folder: str | Path, tokens: int) -> tuple[int, int]:
    """(in-memory need, FP32 weight bytes) of quantizing the Hugging Face folder ``folder``
    with ``tokens`` calibration tokens: this process now plus ``in_memory_need``."""
    import json

    from lowbit.model.shards import TensorFiles

    files = TensorFiles(folder, MemoryCapError)
    weights = sum(files.nbytes(n, as_float32=True) for n in files.names())
    try:
        hidden = int(json.loads((Path(folder) / "config.json").read_text()).get("hidden_size", 0))
    except (OSError, ValueError, TypeError):
        hidden = 0
    return resident_bytes() + in_memory_need(weights, held_inputs_bytes(tokens, hidden, False)), \
        weights
