"""The folder an ONNX export writes: ``model.onnx`` (weights in ``model.onnx.data`` beside
it past ``EXTERNAL_BYTES``: a protobuf message must stay under 2 GiB), the Hugging Face
``config.json`` and the tokenizer's files; built under a temporary name and swapped in when
complete, so an interrupted export leaves nothing under the final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.export.hf_checkpoint import check_folder
from lowbit.model.serialization import remove_stale_temps, swap_in

MODEL = "model.onnx"
DATA = "model.onnx.data"
EXTERNAL_BYTES = 1 << 30


def check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """``hf_checkpoint.check_folder`` for ONNX folders (a ``model.onnx`` marks ours)."""
    return check_folder(path, overwrite, lambda folder: (folder / MODEL).is_file(), "ONNX")


def _save(proto, folder: Path) -> None:
    import onnx

    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weights > EXTERNAL_BYTES:
        onnx.save_model(proto, str(folder / MODEL), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA, size_threshold=1024)
    else:
        onnx.save_model(proto, str(folder / MODEL))


def write_folder(proto, target: Path, overwrite: bool, model, tokenizer) -> int:
    """Write the folder; returns the bytes of ``model.onnx`` and its data file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                dir=target.parent))
    try:
        _save(proto, tmp)
        config = getattr(model, "config", None)
        if hasattr(config, "to_dict"):
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2,
                                                        sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        check_target(target, overwrite)  # it may have appeared while exporting
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum((target / f).stat().st_size for f in (MODEL, DATA) if (target / f).is_file())
