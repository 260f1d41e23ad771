"""Check a safetensors file's header before anything reads its tensors.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``name -> {dtype,
shape, data_offsets}`` plus an optional ``__metadata__``), then the tensor bytes. The checks
turn a truncated, fuzzed or mislabelled file (a pickle renamed ``.safetensors``) into an error
that says what is wrong, instead of the reader's own exception or a crash.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: bits per element of every dtype name the safetensors format defines
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16,
    "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
#: the largest header the safetensors reader accepts (100 MB)
MAX_HEADER = 100_000_000


def _looks_pickled(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def is_pickle(path: Path) -> bool:
    """Whether ``path`` looks like a pickle or ``torch.save`` zip rather than safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    return _looks_pickled(head) and not 0 < n <= min(path.stat().st_size - 8, MAX_HEADER)


def read_header(path: Path, error: type[Exception]) -> tuple[dict, int]:
    """``(header, data_start)`` of safetensors file ``path``; raises ``error`` (a
    ``LowbitError`` subclass) naming the problem when the file is not well-formed."""
    size = path.stat().st_size
    again = "fetch or write the file again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path} is {'empty' if not head else 'truncated'} ({size} bytes): a "
                        f"safetensors file starts with an 8-byte header length; {again}")
        n = int.from_bytes(head, "little")
        raw = f.read(n) if n <= min(size - 8, MAX_HEADER) else None
    try:
        header = None if raw is None else json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if header is None and _looks_pickled(head):
        raise error(f"{path} is a pickle (torch.save output), not safetensors; lowbit never "
                    "unpickles (it can run arbitrary code): convert it to safetensors in a "
                    "process you trust, e.g. safetensors.torch.save_file(state_dict, path)")
    if raw is None:
        raise error(f"{path}: its header length ({n} bytes) runs past the end of the file "
                    f"({size} bytes): the file is truncated or not safetensors; {again}")
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is not a JSON object (corrupt or fuzzed "
                    f"file); {again}")
    data = size - 8 - n
    for name, meta in header.items():
        if name != "__metadata__":
            _check_entry(path, name, meta, data, error)
    return header, 8 + n


def _check_entry(path: Path, name: str, meta: object, data: int,
                 error: type[Exception]) -> None:
    if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list)
            and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
            and all(isinstance(v, int) and v >= 0
                    for v in meta["shape"] + meta["data_offsets"])):
        raise error(f"{path}: the header entry of tensor {name!r} is malformed ({meta!r:.120}); "
                    "the file is corrupt: write it again")
    dtype = meta.get("dtype")
    if dtype not in DTYPE_BITS:
        raise error(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (safetensors dtypes: "
                    f"{', '.join(DTYPE_BITS)}); the file is corrupt or from an incompatible "
                    "writer: write it again")
    begin, end = meta["data_offsets"]
    if end > data:
        raise error(f"{path}: tensor {name!r} ends at byte {end} of the data section, which "
                    f"holds {data} bytes: the file is truncated (offset past the end); fetch "
                    "or write it again")
    need = math.prod(meta["shape"]) * DTYPE_BITS[dtype]
    if begin > end or need != (end - begin) * 8:
        raise error(f"{path}: tensor {name!r} of shape {meta['shape']} and dtype {dtype} "
                    f"needs {need // 8} bytes, but its offsets span {end - begin}: the header "
                    "is corrupt; write the file again")
