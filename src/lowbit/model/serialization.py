"""``save`` / ``load``: a quantized model as safetensors + a JSON manifest. Never pickle.

A checkpoint folder holds:
- ``model.safetensors``: every tensor of the model; quantized linears as lowbit's canonical
  packed codes (``qdata``), ``scale``, ``zero_point``, ``bias`` (``nn.packed``);
- ``manifest.json``: lowbit and file-format versions, the recipe, the source model, the
  Hugging Face config (to rebuild the architecture), and one entry per quantized linear
  (shape, weight spec, activation spec, backend);
- tokenizer files, when the model came with a tokenizer.
Writes go to a temporary folder beside the target, renamed into place when complete, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import Granularity, QParams, get_format
from lowbit.model.recipe import Recipe
from lowbit.nn import ActivationSpec, PackedWeight, QuantizedConv2d, QuantizedLinear, WeightSpec

FILE_FORMAT = "lowbit-checkpoint"
FILE_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(LowbitError, ValueError):
    """A checkpoint folder that cannot be written or read; the message says why."""


def _quantized_entries(model: nn.Module) -> dict[str, dict]:
    entries = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedConv2d):
            entries[name] = m.manifest_entry()
        elif isinstance(m, QuantizedLinear):
            entries[name] = {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
                "weight": m.spec.to_dict(),
                "activation": None if m.activation is None else m.activation.to_dict(),
                "backend": m.backend.name,
                "kernel": m.kernel,
            }
    return entries


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors (tied weights) stored once; returns (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, aliases


def save(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False,
         tokenizer=None) -> Path:
    """Write ``model`` (quantized or not) to ``directory``; refuses an existing one unless
    ``overwrite``."""
    from safetensors.torch import save_file

    target = Path(directory)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; choose another folder or pass "
                              f"overwrite=True (CLI: --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_state(model)
    recipe = getattr(model, "lowbit_recipe", None)
    config = getattr(model, "config", None)
    from lowbit import __version__

    manifest = {
        "format": FILE_FORMAT,
        "format_version": FILE_VERSION,
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "source": getattr(model, "lowbit_spec", None),
        "model_class": type(model).__name__,
        "hf_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "recipe": recipe.to_dict() if isinstance(recipe, Recipe) else None,
        "quantized": _quantized_entries(model),
        "aliases": aliases,
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FILE_FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory)
    if path.is_file() and path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}:
        raise CheckpointError(f"{path} is a pickle file; lowbit never unpickles (it can run "
                              f"arbitrary code): save the model as safetensors instead")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST}); create one "
                              f"with lowbit.save(model, dir) or `lowbit quantize ... -o DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}); re-create the checkpoint") \
            from exc
    if manifest.get("format") != FILE_FORMAT or manifest.get("format_version", 0) > FILE_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer or different tool (format "
            f"{manifest.get('format')!r} v{manifest.get('format_version')}): upgrade lowbit")
    return manifest


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-create it") from exc


def _skeleton(manifest: dict) -> nn.Module:
    config = manifest.get("hf_config")
    if not config:
        raise CheckpointError("this checkpoint holds a custom nn.Module; pass the architecture: "
                              "lowbit.load(dir, model=an_instance_of_it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    auto = AutoModelForCausalLM if manifest.get("model_class", "").endswith("ForCausalLM") \
        else AutoModel
    # built on the CPU (not the meta device) so non-persistent buffers such as rotary
    # frequencies are computed as the architecture defines them
    return auto.from_config(cfg)


def load(directory: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model without re-quantizing (``model``: architecture for custom
    modules; it is modified in place)."""
    path = Path(directory)
    manifest = read_manifest(path)
    tensors = _read_tensors(path / WEIGHTS)
    for alias, key in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    model = model if model is not None else _skeleton(manifest)
    for name, entry in manifest["quantized"].items():
        prefix = f"{name}." if name else ""
        spec = WeightSpec(**entry["weight"])
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
               and "." not in k[len(prefix):]}
        if entry.get("kind") == "conv2d":
            _set_child(model, name, QuantizedConv2d.from_manifest(entry, own))
            continue
        if "qdata" not in own:
            raise CheckpointError(f"{name}: codes missing from {WEIGHTS}; the file is incomplete")
        packed = PackedWeight.from_tensors(own, spec, entry["in_features"])
        act = entry.get("activation")
        activation = ActivationSpec(**act) if act else None
        input_qparams = None
        if "input_scale" in own:
            input_qparams = QParams(get_format("int8"), Granularity.per_tensor(),
                                    own["input_scale"], own.get("input_zero_point"))
        outliers = None
        if "outlier_index" in own:
            outliers = (own["outlier_index"], own["outlier_weight"])
        module = QuantizedLinear(packed, spec, own.get("bias"), activation=activation,
                                 input_qparams=input_qparams, backend=entry.get("backend"),
                                 outliers=outliers)
        _set_child(model, name, module)
    quantized_keys = {k for k in model.state_dict() if any(
        k.startswith(f"{n}.") for n in manifest["quantized"])}
    rest = {k: v for k, v in tensors.items() if k not in quantized_keys}
    _load_rest(model, rest, skip=quantized_keys)
    if manifest.get("recipe"):
        model.lowbit_recipe = Recipe.from_dict(manifest["recipe"])
    model.lowbit_spec = manifest.get("source")
    model.eval()
    return model


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], skip: set[str]) -> None:
    """Load the unquantized tensors, in their saved dtypes, refusing gaps."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    missing = [k for k in model.state_dict() if k not in tensors and k not in skip
               and not any(k.endswith(s) for s in ("inv_freq", "original_inv_freq"))]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors (e.g. {missing[:3]}); "
                              f"it does not match this architecture or is incomplete")
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in own:
                continue
            target = own[key]
            if isinstance(target, nn.Parameter):
                target.data = value.to(target.device)
            else:
                parent_name, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                parent._buffers[child] = value
