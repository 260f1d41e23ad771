"""Goldens: a digest of every tensor a fixed set of recipes writes for the tiny test models.

The model layer may be rearranged freely as long as these stay bit-identical: the packed
codes, scales, zero-points, calibrated input scales and anything an algorithm folds into
the model (AWQ / SmoothQuant scale the norms). ``python -m tests.model.goldens --write``
records them (run it only when a change of numbers is intended, and say why), ``--check``
compares. Both run in a child process with torch's portable vector kernels
(``ATEN_CPU_CAPABILITY=default``, MKL at SSE4.2): AWQ's scale search otherwise lands on
other ties on AVX2 than on AVX-512, and the goldens must hold on every CPU family.

Even so, an Intel Xeon computes other bits than the AMD CPUs that ``goldens.json`` was
recorded on for six of the calibrated recipes (``kmeans4``, ``w4g128-awq``,
``w4g64-awq+gptq``, ``w4g64-gptaq-rot``, ``w4g64-imatrix``, ``w8a8-static``: searches and
statistics on the calibration forward; same code and torch, also at a commit that held on
AMD; ``MKL_CBWR`` and ``ONEDNN_MAX_CPU_ISA`` did not remove it). So each CPU vendor
other than AMD has its own file, ``goldens_<vendor_id>.json``, recorded on it from the
same code as ``goldens.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .tiny import tiny_llama

GOLDENS = Path(__file__).with_name("goldens.json")
RECORDED_ON = "AuthenticAMD"  # the vendor_id of the CPUs goldens.json was recorded on


def goldens_file() -> Path:
    """``goldens.json``, or on a CPU of another vendor its own ``goldens_<vendor_id>.json``."""
    vendor = next((line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), RECORDED_ON) \
        if Path("/proc/cpuinfo").is_file() else RECORDED_ON
    return GOLDENS if vendor == RECORDED_ON else GOLDENS.with_name(f"goldens_{vendor}.json")

#: (recipe, needs calibration data)
RECIPES = (
    ("w8", False), ("w4g64", False), ("w4g32", False), ("w3g64", False), ("w2g16", False),
    ("nf4g64", False), ("fp8", False), ("w8a8", False), ("w8a8-plain", False),
    ("w8a8-static", True), ("w8a8-smooth-rot", True), ("w8a8-outliers", True),
    ("w4g64-gptq", True), ("w4g64-gptaq-rot", True), ("w4g64-awq+gptq", True),
    ("w4g128-awq", True), ("w2g16-hqq", False), ("kmeans4", True), ("w4g64-imatrix", True),
    ("auto:3.5", True),
)


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 64), generator=g) for _ in range(4)]


def digest(model: torch.nn.Module, quantized_only: bool = False) -> dict[str, str]:
    """``name -> sha256[:16]`` of every tensor in the state dict (``quantized_only``: of the
    quantized layers' tensors only)."""
    from lowbit.nn import QuantizedLinear

    quantized = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    out = {}
    for key, tensor in sorted(model.state_dict().items()):
        if quantized_only and not key.startswith(quantized):
            continue
        t = tensor.detach().cpu().reshape(-1).clone()
        h = hashlib.sha256(f"{t.dtype}{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[key] = h.hexdigest()[:16]
    return out


def quantized_digest(recipe: str, calibrated: bool) -> dict[str, str]:
    import lowbit as lb
    from lowbit.kernels import native

    model = tiny_llama(hidden=64)
    # fp32 for the parts left unquantized: "auto" picks bf16 or fp32 by measuring this CPU
    fixed = replace(lb.Recipe.parse(recipe), compute_dtype="fp32")
    with native.force(False):  # the portable paths: same bits on every CPU family
        lb.quantize(model, fixed, calibration() if calibrated else None, progress=False)
    return digest(model)


def record() -> dict[str, dict[str, str]]:
    return {recipe: quantized_digest(recipe, cal) for recipe, cal in RECIPES}


PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def run_portable(flag: str) -> subprocess.CompletedProcess:
    """``python -m tests.model.goldens FLAG`` in a child with the portable kernels."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "tests.model.goldens", flag], cwd=root,
                          env={**os.environ, **PORTABLE, "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=900)


def mismatches(found: dict, expected: dict) -> list[str]:
    bad = []
    for recipe in sorted(set(found) | set(expected)):
        a, b = found.get(recipe, {}), expected.get(recipe, {})
        bad += [f"{recipe}: {k} {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
    return bad


if __name__ == "__main__":
    flag = sys.argv[1] if len(sys.argv) > 1 else ""
    if flag not in ("--write", "--check"):
        sys.exit("usage: python -m tests.model.goldens --write | --check")
    if any(os.environ.get(k) != v for k, v in PORTABLE.items()):
        done = run_portable(flag)
        print(done.stdout + done.stderr, end="")
        sys.exit(done.returncode)
    torch.set_num_threads(1)
    path = goldens_file()
    if flag == "--write":
        path.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    elif not path.is_file():
        sys.exit(f"no goldens for this CPU's vendor: record {path.name} from a commit whose "
                 f"goldens.json holds (python -m tests.model.goldens --write)")
    else:
        bad = mismatches(record(), json.loads(path.read_text()))
        print("\n".join(bad[:40]) or f"goldens hold ({path.name})")
        sys.exit(1 if bad else 0)
