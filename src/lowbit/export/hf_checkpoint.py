"""A Hugging Face model folder written from a lowbit model: ``config.json`` (with a
``quantization_config``), ``model.safetensors`` and the tokenizer's files.

Shared by the compressed-tensors and GPTQ exporters, which supply the tensors of each
quantized layer; everything else (embedding, norms, layers left unquantized) is written here
in the folder's float ``dtype``. The folder is built under a temporary name beside the
target and renamed when complete, so an interrupted export leaves nothing under the final
name; ``overwrite`` replaces only a folder an export wrote (``config.json`` holding a
``quantization_config``) or an empty one, never a model's own files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.export.gguf_weights import ExportError
from lowbit.model.serialization import remove_stale_temps, swap_in
from lowbit.nn import QuantizedLinear

#: the float dtypes an export folder stores (unquantized tensors and scales)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS = "model.safetensors"


@dataclass
class FolderReport:
    """What an export to a Hugging Face folder wrote."""

    path: Path
    format: str
    dtype: str
    folder_bytes: int
    weights_bytes: int
    carried: int  # quantized layers written with lowbit's own codes
    float_layers: list[str] = field(default_factory=list)  # left (or written) as floats
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.path}: {self.format}, {self.folder_bytes / 2**20:.1f} MiB "
                f"(weights {self.weights_bytes / 2**20:.1f} MiB, {self.dtype} floats); "
                f"{self.carried} layers carry lowbit's codes unchanged")
        if self.float_layers:
            text += f"; {len(self.float_layers)} float linears"
        return "\n  ".join([text, *self.notes])


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_folder(path: str | os.PathLike, overwrite: bool,
                 exported: Callable[[Path], bool], kind: str) -> Path:
    """The folder to write; refuses an existing one without ``overwrite``, and even with
    it anything but an earlier export (``exported(folder)``) or an empty folder, so a
    model's own files are never deleted."""
    target = Path(path)
    if not target.exists():
        return target
    if not overwrite:
        raise ExportError(f"{target} already exists; choose another folder or pass "
                          "overwrite=True (CLI: --overwrite)")
    if not target.is_dir() or (any(target.iterdir()) and not exported(target)):
        what = "a file" if not target.is_dir() else f"a folder that no {kind} export wrote"
        raise ExportError(f"{target} is {what}; --overwrite only replaces an exported "
                          f"{kind} folder, so other files are never deleted: choose another "
                          "folder or remove it yourself")
    return target


def _quantized_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "quantization_config" in config.read_text(errors="ignore")


def check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """``check_folder`` for the Hugging Face exports (a ``quantization_config`` marks ours)."""
    return check_folder(path, overwrite, _quantized_folder, "model")


def load_with_tokenizer(model, tokenizer):
    """(model, tokenizer) from an ``nn.Module`` or anything ``lowbit.load_model`` opens; the
    tokenizer is the model's own unless one is given (every exporter opens its input so)."""
    from lowbit.model import load_model, load_tokenizer

    if not isinstance(model, nn.Module):
        spec = os.fspath(model)
        model = load_model(spec)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    elif tokenizer is None:
        tokenizer = load_tokenizer(model)  # through model.lowbit_spec, or a clear error
    return model, tokenizer


def open_model(model, tokenizer):
    """``load_with_tokenizer``, for a model with a Hugging Face config."""
    model, tokenizer = load_with_tokenizer(model, tokenizer)
    if not hasattr(getattr(model, "config", None), "to_dict"):
        raise ExportError(f"{type(model).__name__} has no Hugging Face config; this format is a "
                          "Hugging Face model folder: export a transformers model "
                          "(AutoModelForCausalLM) quantized by lowbit")
    return model, tokenizer


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _tied_head(model: nn.Module) -> bool:
    head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    return (type(head) is nn.Linear and embed is not None
            and head.weight.data_ptr() == embed.weight.data_ptr())


def float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict:
    """Every state-dict tensor outside the modules in ``skip``, floats in ``dtype``; a tied
    head is left out (the folder's config keeps it tied)."""
    tied = _tied_head(model)
    out = {}
    for key, t in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in skip or key.endswith("inv_freq") or (tied and key == "lm_head.weight"):
            continue
        t = t.detach()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def config_dict(model: nn.Module, dtype: str) -> dict:
    """The model's Hugging Face config for the folder: its float dtype, and an untied head
    when the head is quantized or was untied by lowbit."""
    config = model.config.to_dict()
    key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
    config[key] = str(DTYPES[dtype]).removeprefix("torch.")
    config.pop("quantization_config", None)
    head = getattr(model, "lm_head", None)
    if config.get("tie_word_embeddings") and head is not None and not _tied_head(model):
        config["tie_word_embeddings"] = False
    return config


def write_folder(target: Path, overwrite: bool, tensors: dict[str, torch.Tensor],
                 config: dict, tokenizer, finish: Callable[[Path], None] | None = None) -> int:
    """Write the folder under a temporary name, then rename it to ``target``;
    ``finish(tmp)`` may add files (e.g. the quantization config). Returns its bytes."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if finish is not None:
            finish(tmp)
        check_target(target, overwrite)  # it may have appeared while exporting
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in target.iterdir() if f.is_file())


def scale_rounding(scale: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest relative change of a scale stored in ``dtype`` (0: exact)."""
    s = scale.detach().double()
    stored = s.to(dtype).double()
    nonzero = s != 0
    if not bool(nonzero.any()):
        return 0.0
    return float(((stored - s).abs()[nonzero] / s.abs()[nonzero]).max())
