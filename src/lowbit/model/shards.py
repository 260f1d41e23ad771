"""Safetensors folders read one tensor at a time and written one unit at a time.

``TensorFiles`` indexes a folder's safetensors files from their JSON headers (one file, or
shards listed by ``model.safetensors.index.json``) and reads single tensors with plain file
reads into fresh memory: nothing is memory-mapped, so what the process holds is exactly the
tensors it keeps (a mapping would keep a whole shard's pages resident and, under an address
space limit, count whole files). The index is checked against the shards first: a shard the
index names but the folder lacks, and a shard whose header disagrees with the index, are
``ShardError``s naming the file and the fix.

``ShardWriter`` writes one file per unit (``model-00003-of-00026.safetensors``), each to a
temporary name renamed when complete, and the index over the files at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.model.safetensors_header import read_header

INDEX = "model.safetensors.index.json"

#: safetensors dtype names torch reads
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class ShardError(LowbitError, ValueError):
    """A sharded checkpoint whose files disagree with each other; the message names the fix."""


class TensorFiles:
    """``name -> (file, byte offset, dtype, shape)`` over a folder's safetensors files."""

    def __init__(self, folder: str | os.PathLike, error: type[Exception] = ShardError):
        self.folder = Path(folder)
        self.error = error
        self.entries: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        index = self.folder / INDEX
        files = _indexed_shards(index, error) if index.is_file() else None
        for file in files if files is not None else sorted(self.folder.glob("*.safetensors")):
            header, start = read_header(file, error)
            for name, meta in header.items():
                if name != "__metadata__":
                    self.entries[name] = (file, start + meta["data_offsets"][0], meta["dtype"],
                                          tuple(meta["shape"]))
        if files is not None:
            _check_index_agrees(index, files, self.entries, error)
        if not self.entries:
            raise error(f"{self.folder} holds no safetensors tensors; pass a folder with "
                        "config.json and *.safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str, as_float32: bool = False) -> int:
        """Bytes of tensor ``name`` as stored (``as_float32``: once read as float32)."""
        _, _, dtype, shape = self.entries[name]
        numel = 1
        for s in shape:
            numel *= s
        if as_float32 and TORCH_DTYPES.get(dtype, torch.uint8).is_floating_point:
            return 4 * numel
        return numel * TORCH_DTYPES[dtype].itemsize if dtype in TORCH_DTYPES else numel

    def read(self, name: str, float32: bool = False) -> torch.Tensor:
        """Tensor ``name`` in fresh memory (``float32``: floating tensors converted)."""
        file, offset, dtype, shape = self.entries[name]
        if dtype not in TORCH_DTYPES:
            raise self.error(f"{file}: tensor {name!r} has dtype {dtype}, which lowbit does not "
                             "read; convert the checkpoint to float32, float16 or bfloat16")
        raw = torch.empty(self.nbytes(name), dtype=torch.uint8)
        read_into(file, offset, raw.numpy(), self.error)
        t = raw.view(TORCH_DTYPES[dtype]).reshape(shape)
        return t.float() if float32 and t.is_floating_point() and t.dtype != torch.float32 else t


def read_into(file: Path, offset: int, out, error: type[Exception]) -> None:
    """Fill the writable buffer ``out`` from ``file`` at ``offset`` with plain reads."""
    view = memoryview(out).cast("B")
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        while view.nbytes:  # one read returns at most ~2 GiB on Linux
            got = f.readinto(view)
            if not got:
                raise error(f"{file} ends early: the file is truncated; fetch it again")
            view = view[got:]


def _indexed_shards(index: Path, error: type[Exception]) -> list[Path]:
    """The shard files ``index`` names, each present (else ``error`` naming the missing)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise error(f"{index} is corrupt ({exc!r:.120}): it must be JSON with a 'weight_map'; "
                    "restore it from the model's source") from exc
    missing = [s for s in shards if not (index.parent / str(s)).is_file()]
    if missing:
        raise error(f"{index} names shards that are not in the folder: {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}; the download or copy is "
                    "incomplete: fetch the missing files")
    return [index.parent / s for s in shards]


def _check_index_agrees(index: Path, files: list[Path], entries: dict, error) -> None:
    """Every tensor of the index lies in the shard the index names, and no shard holds a
    tensor the index does not list (it would be silently dropped)."""
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in weight_map.items():
        where = entries.get(name)
        if where is None or where[0].name != shard:
            found = "is in no shard" if where is None else f"is in {where[0].name}"
            raise error(f"{index.parent / shard}: its header disagrees with {index.name}: the "
                        f"index puts tensor {name!r} there, but it {found}; the shard and the "
                        "index come from different versions of the model: fetch both again")
    extra = sorted(n for n in entries if n not in weight_map)
    if extra:
        raise error(f"{entries[extra[0]][0]}: its header disagrees with {index.name}: it holds "
                    f"{len(extra)} tensors the index does not list (e.g. {extra[:3]}); the "
                    "shard and the index come from different versions: fetch both again")


class ShardWriter:
    """Writes unit ``i`` of ``count`` as ``model-<i+1>-of-<count>.safetensors`` in ``folder``."""

    def __init__(self, folder: Path, count: int):
        self.folder, self.count = folder, count

    def name(self, unit: int) -> str:
        return f"model-{unit + 1:05d}-of-{self.count:05d}.safetensors"

    def write(self, unit: int, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        path = self.folder / self.name(unit)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, path)
        return path

    def write_index(self) -> dict[str, str]:
        """``model.safetensors.index.json`` over the unit files; returns its weight map."""
        weight_map, total = {}, 0
        for unit in range(self.count):
            path = self.folder / self.name(unit)
            header, _ = read_header(path, ShardError)
            for name, meta in header.items():
                if name != "__metadata__":
                    weight_map[name] = path.name
                    total += meta["data_offsets"][1] - meta["data_offsets"][0]
        (self.folder / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return weight_map
