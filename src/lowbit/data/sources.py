"""Named texts that ship with CPython 3.11, for calibration and held-out evaluation.

Every source is read from the running interpreter's standard library, so it is available
offline and deterministic for a given CPython version (the published numbers use 3.11.7;
another patch release may differ by a few lines). Files are taken in the order of the SHA-1
of their path relative to the standard library, a fixed shuffle that mixes packages without
depending on the file system's listing order.

Calibration sources (the ``"default"`` mix, ``MIX``, draws windows from each in turn):

- ``"pydoc"`` past token 20000 (``CALIBRATION_OFFSET``): the language/library reference
  topics; tokens 0..16383 are the in-domain evaluation windows and never calibrate.
- ``"docstrings"``: module, class and function docstrings of the standard library,
  extracted with ``ast`` (API prose with inline code).
- ``"stdlib-code"``: standard-library Python source as written (code, comments, strings).

Tokens with SmolLM2's tokenizer (CPython 3.11.7): pydoc 113,107 (93,107 past 20000),
docstrings 107,815, stdlib-code 104,534, idle-news 26,762, email 31,861; the mix holds
181 rounds of 3 windows of 512 (278,016 tokens), of which the CLI reads the first 16,384.
Why these: pydoc alone is reference prose; docstrings add API prose written by many hands,
code adds the identifiers, indentation and comments that dominate Python files, and all
three ship inside every CPython install, so the mix needs no download.

Not in the mix: ``"generated"`` (``lowbit.data.generated``), windows sampled from the FP32
model itself (LLM-QAT, Liu et al. 2023). ``benchmarks/calibration_domains.py`` (SmolLM2-135M,
8 windows, llama.cpp protocol) gives KLD pydoc / idle-news / email with 16,384 tokens of
``default``, ``default+generated@0.25`` (every 4th window generated) and ``generated``:
w4g64-gptq-rot 0.043/0.041/0.067, 0.049/0.039/0.064, 0.059/0.043/0.064; w4g128-gptq
0.102/0.089/0.125, 0.106/0.085/0.123, 0.138/0.096/0.122. The held-out KLDs move by at most
5% while in-domain KLD grows by 5-36%: generated text lowers the out-/in-domain ratio only by
losing in-domain accuracy, so it stays an option. More tokens of ``default`` (32,768) widen
the gap instead (w4g64-gptq-rot 0.041/0.041/0.072).

Held-out sources (``HELD_OUT``; calibration never reads them, nor the packages they come
from: ``email``, ``idlelib``, ``test`` and ``pydoc_data`` are left out of the two above):

- ``"idle-news"``: IDLE's change logs (``idlelib/NEWS.txt``, ``NEWS2x.txt``,
  ``HISTORY.txt``): terse release-note prose with issue numbers and names.
- ``"email"``: the RFC 822/MIME test messages of ``Lib/test/test_email/data`` (headers,
  quoted replies, MIME parts). Some distributions drop ``Lib/test`` (Debian's python3.11
  without ``libpython3.11-testsuite``): then it raises ``CorpusError`` with that fix.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from pathlib import Path

from lowbit.errors import LowbitError


class CorpusError(LowbitError, ValueError):
    """The corpus cannot provide what was asked; the message names the fix."""

__all__ = ["CALIBRATION_SOURCES", "HELD_OUT", "MIX", "NAMED", "named_text", "stdlib_dir"]

#: the kinds of text the default calibration mix draws from, in turn
MIX = ("pydoc", "docstrings", "stdlib-code")
CALIBRATION_SOURCES = MIX
#: texts calibration never sees, for out-of-domain evaluation (``lowbit eval --data NAME``)
HELD_OUT = ("idle-news", "email")
#: every named source (``"default"`` is the mix itself)
NAMED = ("default",) + MIX + HELD_OUT
#: packages whose files neither calibration source reads (held out, or the eval text itself)
_EXCLUDED = ("test", "tests", "idlelib", "email", "pydoc_data", "site-packages", "lib2to3",
             "turtledemo", "encodings", "__pycache__", "config-3")
#: characters read per source (enough for 64k+ tokens of each)
_CHARS = 400_000


def _error(msg: str) -> LowbitError:
    return CorpusError(msg)


def stdlib_dir() -> Path:
    """The running interpreter's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _ordered_py_files() -> list[Path]:
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py")
             if not any(part.startswith(_EXCLUDED) for part in p.relative_to(root).parts)]
    if not files:
        raise _error(f"no Python sources under {root}: this interpreter ships without its "
                     "standard library source; use a full CPython 3.11 install or pass "
                     "--calibration FILE")
    rel = {p: p.relative_to(root).as_posix() for p in files}
    return sorted(files, key=lambda p: hashlib.sha1(rel[p].encode()).hexdigest())


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # a few test-like files are not UTF-8
        return None


@functools.cache
def stdlib_code(chars: int = _CHARS) -> str:
    """Standard-library source files, whole, in the fixed order, up to ``chars`` characters."""
    out, n = [], 0
    for path in _ordered_py_files():
        src = _read(path)
        if not src or not src.strip():
            continue
        out.append(src.strip())
        n += len(out[-1])
        if n >= chars:
            break
    return "\n\n".join(out)


@functools.cache
def stdlib_docstrings(chars: int = _CHARS) -> str:
    """Docstrings (module, class, function; ``ast.get_docstring``, cleaned) of the
    standard library in the fixed file order, one blank line apart, up to ``chars``."""
    out, n = [], 0
    for path in _ordered_py_files():
        src = _read(path)
        try:
            tree = ast.parse(src or "")
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 40:  # skip one-liners such as "Return x."
                    out.append(doc)
                    n += len(doc)
        if n >= chars:
            break
    return "\n\n".join(out)


def _files(label: str, paths: list[Path], fix: str) -> str:
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise _error(f"the {label!r} text needs {missing[0] if missing else paths} from the "
                     f"standard library, which this Python lacks; {fix}")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)


def idle_news() -> str:
    root = stdlib_dir() / "idlelib"
    return _files("idle-news", [root / n for n in ("NEWS.txt", "NEWS2x.txt", "HISTORY.txt")],
                  "install IDLE (Debian: apt install idle-python3.11) or use another --data")


def email_messages() -> str:
    root = stdlib_dir() / "test" / "test_email" / "data"
    paths = sorted(root.glob("msg_*.txt")) if root.is_dir() else [root / "msg_01.txt"]
    return _files("email", paths, "install the test suite (Debian: apt install "
                  "libpython3.11-testsuite) or use another --data")


def named_text(name: str) -> str:
    """The text of a named source other than ``"pydoc"`` and ``"default"`` (module doc)."""
    readers = {"docstrings": stdlib_docstrings, "stdlib-code": stdlib_code,
               "idle-news": idle_news, "email": email_messages}
    if name not in readers:
        raise _error(f"unknown text {name!r}; named texts: {', '.join(NAMED)}, "
                     "or the path to a UTF-8 file")
    return readers[name]()
