"""Walk a GGUF file's header before any reader trusts it.

Layout (v2/v3): ``b"GGUF"``, version (u32), tensor count (u64), key-value count (u64), the
key-value pairs (key string, value type u32, value), the tensor infos (name, n_dims u32, dims
u64 each, ggml type u32, offset u64), padding to ``general.alignment`` (32), the tensor data.
Strings are a u64 length and the bytes. Every length and count is checked against the file's
size, every type id against the known ones, so a truncated or fuzzed file gets an error naming
the field instead of a reader's exception, a huge allocation or a hang.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

#: sizes of the fixed-width GGUF value types (8: string and 9: array are variable)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 8


class _Reader:
    def __init__(self, buf, path: Path, error: type[Exception]):
        self.buf, self.pos, self.path, self.error = buf, 0, path, error

    def fail(self, what: str) -> Exception:
        return self.error(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)}); the "
                          "GGUF file is truncated or corrupt: fetch or convert it again")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} ({n} bytes) runs past the end of the file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"length of {what}"), what)

    def value(self, vtype: int, key: str) -> object:
        if vtype in _SCALAR:
            raw = self.take(_SCALAR[vtype], f"value of {key}")
            return int.from_bytes(raw, "little") if vtype in (4, 10) else None
        if vtype == _STRING:
            self.string(f"value of {key}")
            return None
        if vtype != _ARRAY:
            raise self.fail(f"key {key!r} has unknown value type {vtype}")
        item, count = self.u32(f"array type of {key}"), self.u64(f"array length of {key}")
        if item in _SCALAR:
            self.take(count * _SCALAR[item], f"array {key!r} of {count} items")
        elif item == _STRING:
            if count * 8 > len(self.buf) - self.pos:
                raise self.fail(f"array {key!r} of {count} strings runs past the end of the file")
            for _ in range(count):
                self.string(f"an item of {key}")
        else:
            raise self.fail(f"array {key!r} has unknown item type {item}")
        return None


def check_gguf(path: Path, error: type[Exception]) -> tuple[int, int]:
    """Raise ``error`` naming the first field of ``path`` that is not a well-formed GGUF;
    returns (tensor count, total number of weights) of a well-formed one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] != b"GGUF":
            what = "it is empty" if not head else f"it starts with {head[:4]!r}, not b'GGUF'"
            raise error(f"{path} is not a GGUF file ({what}); the file is corrupt or has the "
                        "wrong extension: fetch it again")
        version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
        if version not in SUPPORTED_VERSIONS:
            raise error(f"{path}: GGUF version {version} is not supported (lowbit reads versions "
                        f"{' and '.join(map(str, SUPPORTED_VERSIONS))}); the file is truncated, "
                        "corrupt or from a newer llama.cpp: re-convert it")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as buf:
            return _walk(_Reader(buf, path, error))


def _walk(r: _Reader) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES

    r.take(8, "magic and version")
    n_tensors, n_kv = r.u64("tensor count"), r.u64("key-value count")
    alignment = 32
    for i in range(n_kv):  # each pair needs at least 12 bytes: a short count fails fast
        key = r.string(f"key {i} of {n_kv}").decode("utf-8", "replace")
        value = r.value(r.u32(f"value type of {key}"), key)
        if key == "general.alignment" and value:
            alignment = int(value)
    infos = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i} of {n_tensors}").decode("utf-8", "replace")
        n_dims = r.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [r.u64(f"dimension of {name}") for _ in range(n_dims)]
        ggml_type, offset = r.u32(f"type of {name}"), r.u64(f"offset of {name}")
        if ggml_type not in GGML_QUANT_SIZES:
            raise r.fail(f"tensor {name!r} has unknown ggml type id {ggml_type}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        count = 1
        for d in dims:
            count *= d
        infos.append((name, offset, count // block * type_size, count))
    start = r.pos + (-r.pos % alignment)
    for name, offset, nbytes, _ in infos:
        if start + offset + nbytes > len(r.buf):
            raise r.error(f"{r.path}: tensor {name!r} ({nbytes} bytes at offset {offset}) runs "
                          f"past the end of the file ({len(r.buf)} bytes): the GGUF file is "
                          "truncated; fetch or convert it again")
    end = 0
    for name, offset, nbytes, _ in sorted(infos, key=lambda i: i[1]):
        if offset < end:  # a fuzzed offset would read another tensor's bytes
            raise r.error(f"{r.path}: tensor {name!r} at offset {offset} overlaps the tensor "
                          "before it: the GGUF metadata is corrupt; fetch or convert it again")
        end = offset + nbytes
    return n_tensors, sum(info[3] for info in infos)


def check_size(path: Path, config, counts: tuple[int, int], error: type[Exception]) -> None:
    """Refuse metadata that describes a larger model than the file holds (a fuzzed block
    count or width), before the model is allocated: built on the meta device, counted."""
    import torch
    from transformers import AutoModelForCausalLM

    n_tensors, n_weights = counts
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if layers > n_tensors:
        raise error(f"{path}: the metadata says {layers} blocks but the file holds "
                    f"{n_tensors} tensors: the GGUF metadata is corrupt; fetch it again")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with torch.device("meta"), no_init_weights():
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if params > 1.5 * n_weights:
        raise error(f"{path}: the metadata describes a model of {params:,} weights but the "
                    f"file holds {n_weights:,}: the GGUF metadata is corrupt or incomplete; "
                    "fetch it again")
