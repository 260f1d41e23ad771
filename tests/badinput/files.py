"""Byte-level makers for the bad-input corpus: broken safetensors, hand-written GGUF files and
pickles that would leave a marker file behind if anything ever unpickled them."""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path

import torch

# -- safetensors ----------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a well-formed safetensors file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def _last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])


def st_truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def st_header_past_end(data: bytes) -> bytes:
    return (len(data) + 4096).to_bytes(8, "little") + data[8:]


def st_garbage_header(data: bytes) -> bytes:
    """The JSON header replaced by random bytes of the same length."""
    n = int.from_bytes(data[:8], "little")
    rng = random.Random(18)
    return data[:8] + bytes(rng.randrange(256) for _ in range(n)) + data[8 + n:]


def st_cut_json(data: bytes) -> bytes:
    """The JSON header cut in the middle and padded with spaces (valid length, invalid JSON)."""
    n = int.from_bytes(data[:8], "little")
    return data[:8] + data[8:8 + n // 2] + b" " * (n - n // 2) + data[8 + n:]


def st_not_object(data: bytes) -> bytes:
    _, body = split_safetensors(data)
    return join_safetensors(b'["not", "an", "object"]', body)


def st_wrong_dtype(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header[_first_tensor(header)]["dtype"] = "F31"
    return join_safetensors(header, body)


def st_offsets_past_end(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    entry = header[_last_tensor(header)]
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin + 10**6, end + 10**6]
    return join_safetensors(header, body)


def st_shape_mismatch(data: bytes) -> bytes:
    """A shape whose byte size disagrees with the tensor's data offsets."""
    header, body = split_safetensors(data)
    entry = header[_first_tensor(header)]
    entry["shape"] = [d * 2 for d in entry["shape"]] or [2]
    return join_safetensors(header, body)


SAFETENSORS_DAMAGE = {
    "truncated": (st_truncated, ("truncated", "ends")),
    "header-length-past-end": (st_header_past_end, ("header",)),
    "garbage-header": (st_garbage_header, ("header",)),
    "cut-json-header": (st_cut_json, ("header",)),
    "header-not-object": (st_not_object, ("header",)),
    "wrong-dtype": (st_wrong_dtype, ("dtype",)),
    "offsets-past-end": (st_offsets_past_end, ("offset", "truncated", "ends")),
    "shape-vs-offsets": (st_shape_mismatch, ("shape", "size", "bytes")),
}

# -- GGUF -----------------------------------------------------------------------------------

_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def gguf_bytes(*, magic: bytes = b"GGUF", version: int = 3, tensor_count: int | None = None,
               kv_count: int | None = None, key_length: int | None = None,
               array_count: int | None = None, tensor_type: int = 0, blocks: int = 1) -> bytes:
    """A small GGUF file (llama metadata, one 4 x 4 tensor), with one field set wrong."""
    kvs = [
        _gstr("general.architecture", key_length) + struct.pack("<I", _STRING) + _gstr("llama"),
        _gstr("llama.block_count") + struct.pack("<I", _UINT32) + struct.pack("<I", blocks),
        _gstr("tokenizer.ggml.scores") + struct.pack("<II", _ARRAY, _UINT32)
        + struct.pack("<Q", 3 if array_count is None else array_count)
        + struct.pack("<3I", 1, 2, 3),
    ]
    info = _gstr("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<2Q", 4, 4) \
        + struct.pack("<I", tensor_type) + struct.pack("<Q", 0)
    head = magic + struct.pack("<I", version) + struct.pack(
        "<QQ", 1 if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count)
    out = head + b"".join(kvs) + info
    out += b"\0" * (-len(out) % 32)
    return out + torch.arange(16, dtype=torch.float32).numpy().tobytes()


GGUF_CASES = {
    "bad-magic": (dict(magic=b"GGUX"), ("not a GGUF",)),
    "unsupported-version": (dict(version=99), ("version 99",)),
    "version-1": (dict(version=1), ("version 1",)),
    "string-length-past-end": (dict(key_length=2**40), ("key 0 of 3",)),
    "array-count-past-end": (dict(array_count=2**40), ("array",)),
    "tensor-count-past-end": (dict(tensor_count=10**6), ("tensor",)),
    "kv-count-past-end": (dict(kv_count=10**6), ("of 1000000",)),
    "unknown-tensor-type": (dict(tensor_type=999), ("ggml type id 999",)),
    "block count past the tensors": (dict(blocks=2**24), ("16777216 blocks",)),
    "metadata of a bigger model": (dict(), ("describes a model of",)),
}


def _offset_field(data: bytes, name: str) -> int:
    """Byte position of tensor ``name``'s data offset in a GGUF's tensor infos."""
    raw = name.encode()
    pos = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims + 4


def gguf_alias_tensor(data: bytes, name: str, onto: str) -> bytes:
    """Point tensor ``name``'s data offset at tensor ``onto``'s bytes."""
    out = bytearray(data)
    src, dst = _offset_field(data, onto), _offset_field(data, name)
    out[dst:dst + 8] = data[src:src + 8]
    return bytes(out)


def gguf_set_u32(data: bytes, key: str, value: int) -> bytes:
    """Set the u32 value of metadata ``key``."""
    raw = key.encode()
    pos = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw) + 4
    return data[:pos] + struct.pack("<I", value) + data[pos + 4:]

# -- pickles --------------------------------------------------------------------------------


class Booby:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): proof that a file was
    unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_raw_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Booby(marker)}))
    return path


def write_torch_pickle(path: Path, marker: Path) -> Path:
    """``torch.save`` output (a zip holding a pickle) with the booby-trapped object inside."""
    torch.save({"weight": torch.zeros(2), "trap": Booby(marker)}, path)
    return path
