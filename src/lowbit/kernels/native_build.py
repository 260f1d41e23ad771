"""Compiling lowbit's C sources (``csrc/``) into shared libraries in the cache, once per
source version: the system's C compiler (``$CC``, else cc/gcc/clang), a temporary file
renamed when complete, earlier versions pruned. ``native`` loads and binds them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_CSRC = Path(__file__).with_name("csrc")
#: the GEMVs, the fused small operations of a decode step and the whole-step loop (AVX2 +
#: FMA; the loop's AVX512-VNNI functions carry their own target attributes)
SOURCES = (_CSRC / "gemv_avx2.c", _CSRC / "decode_ops.c", _CSRC / "decode_loop.c",
           _CSRC / "q8_vnni.c", _CSRC / "q8_tiles.c", _CSRC / "q8_avx2.c",
           _CSRC / "weight_dequant.c", _CSRC / "lut_gemv.c", _CSRC / "prefill_attention.c",
           _CSRC / "w8a8_prefill.c")
HEADERS = (_CSRC / "simd_avx2.h", _CSRC / "lowbit_native.h")  # part of the build's hash
#: the solvers' column loops: plain C, built without x86 flags
SOLVE_SOURCES = (_CSRC / "solve_ops.c",)
_STEM = "lowbit-native"
_SOLVE_STEM = "lowbit-solve"
_COMMON = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
FLAGS = ("-mavx2", "-mfma", *_COMMON)
SOLVE_FLAGS = _COMMON
_build_failure: str | None = None  # set when a compiler was missing or failed


class NativeUnavailableWarning(UserWarning):
    """lowbit's C kernels could not be built; torch's (slower) kernels run instead."""


def cache_root() -> Path:
    """lowbit's cache directory: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def _cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:  # an explicit choice: use it or report it, never another compiler
        return cc if shutil.which(cc) else None
    return next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)


def _tag(sources: tuple[Path, ...], flags: tuple[str, ...]) -> str:
    source = b"".join(path.read_bytes() for path in sources)
    return hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]


def library_tag() -> str:
    """Hash of the decode library's sources and flags (part of ``autotune``'s cache key)."""
    return _tag(SOURCES + HEADERS, FLAGS)


def _build(sources=SOURCES, flags=FLAGS, stem=_STEM, headers=HEADERS) -> Path:
    """The compiled library, built once per source version into the cache."""
    out = _cache_dir() / f"{stem}-{_tag(sources + headers, flags)}.so"
    if out.exists():
        return out
    cc = _compiler()
    if cc is None:
        named = os.environ.get("CC")
        raise RuntimeError(f"C compiler CC={named!r} not found (install it, or unset CC)"
                           if named else "no C compiler found (install gcc, or set CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *map(str, sources), "-o", tmp],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-400:]}")
        os.replace(tmp, out)  # atomic: another process sees the whole library or nothing
        legacy = out.parent.glob("gemv_avx2-*.so") if stem == _STEM else ()
        for old in (*out.parent.glob(f"{stem}-*.so"), *legacy):
            if old != out:  # earlier source versions (a process that still maps one keeps
                old.unlink(missing_ok=True)  # its pages: unlinking is safe on Linux)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(sources, flags, stem, headers) -> ctypes.CDLL:
    """Build and load one library; a missing compiler or failed build warns once."""
    global _build_failure
    try:
        return ctypes.CDLL(str(_build(sources, flags, stem, headers)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        why = f"could not build {', '.join(p.name for p in sources)}: {exc}"
        if _build_failure is None:
            warnings.warn(f"lowbit's native kernels are unavailable, torch's slower kernels "
                          f"run instead ({why}); install gcc or set CC to a C compiler",
                          NativeUnavailableWarning, stacklevel=4)
        _build_failure = why
        raise RuntimeError(why) from exc


def build_failure() -> str | None:
    """Why a build attempted in this process failed (no compiler, compiler error), or None;
    never builds anything itself (summaries call it)."""
    return _build_failure
