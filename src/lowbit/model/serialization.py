"""``save`` / ``load``: a quantized model as safetensors + a JSON manifest. Never pickle.

A checkpoint folder holds:
- ``model.safetensors``: every tensor of the model; quantized linears as lowbit's canonical
  packed codes (``qdata``), ``scale``, ``zero_point``, ``bias`` (``nn.packed``);
- ``manifest.json``: lowbit and file-format versions, the recipe, the source model, the
  Hugging Face config (to rebuild the architecture), and one entry per quantized linear
  (shape, weight spec, activation spec, backend);
- tokenizer files, when the model came with a tokenizer.
Writes are atomic: a crash never leaves a half-written checkpoint under the final name
(``checkpoint_folder.py``).
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
from lowbit.model.checkpoint_folder import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    check_target,
    recover,
    remove_stale_temps,
    swap_in,
)
from lowbit.model.recipe import Recipe
from lowbit.model.safetensors_header import read_header
from lowbit.nn import ActivationSpec, PackedWeight, QuantizedConv2d, QuantizedLinear, WeightSpec

FILE_FORMAT = "lowbit-checkpoint"
FILE_VERSION = 1


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

    target = check_target(directory, overwrite)
    tensors, aliases = _unique_state(model)
    manifest = build_manifest(model, _quantized_entries(model), aliases,
                              {k: v.dtype for k, v in tensors.items()})
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=target.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write {target}: {exc}; choose a writable folder") from exc
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FILE_FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        swap_in(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"writing {target} failed ({exc}); nothing was written under "
                                  "that name: free some space or choose another folder") from exc
        raise
    return target


def build_manifest(model: nn.Module, quantized: dict, aliases: dict,
                   dtypes: dict[str, torch.dtype]) -> dict:
    """``manifest.json`` of ``model`` (its recipe, source and config) with the entries of
    its quantized layers, its tied aliases and the dtype of every stored tensor."""
    from lowbit.version import __version__

    recipe = getattr(model, "lowbit_recipe", None)
    config = getattr(model, "config", None)
    return {
        "format": FILE_FORMAT,
        "format_version": FILE_VERSION,
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "source": getattr(model, "lowbit_spec", None),
        "model_class": type(model).__name__,
        "hf_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "recipe": recipe.to_dict() if isinstance(recipe, Recipe) else None,
        "algorithms": recipe.algorithm_options() if isinstance(recipe, Recipe) else {},
        # which text calibrated it, where the caller said (``lowbit quantize`` does)
        "calibration": getattr(model, "lowbit_calibration_text", None),
        "quantized": quantized,
        "aliases": aliases,
        "dtypes": {k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
    }


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory)
    if path.is_file() and path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}:
        raise CheckpointError(f"{path} is a pickle file; lowbit never unpickles (it can run "
                              f"arbitrary code): save the model as safetensors instead")
    recover(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST}); create one "
                              f"with lowbit.save(model, dir) or `lowbit quantize ... -o DIR`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}); re-create the checkpoint") \
            from exc
    _check_manifest(manifest_path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: object) -> None:
    """The manifest's layout, before anything trusts it; errors name the bad field."""
    redo = "re-create the checkpoint (lowbit.save or `lowbit quantize -o`)"
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} is corrupt: the manifest is not a JSON object; {redo}")
    version = manifest.get("format_version")
    if manifest.get("format") != FILE_FORMAT or not isinstance(version, int):
        raise CheckpointError(
            f"{path} is not a lowbit checkpoint manifest (format {manifest.get('format')!r}, "
            f"version {version!r}; expected {FILE_FORMAT!r} v{FILE_VERSION}); {redo}")
    if version > FILE_VERSION:
        raise CheckpointError(f"{path} is format version {version}, newer than this lowbit "
                              f"reads ({FILE_VERSION}): upgrade lowbit")
    for key in ("quantized", "aliases", "dtypes"):
        value = manifest.get(key, {})
        if not isinstance(value, dict) or key == "quantized" and (
                key not in manifest or not all(isinstance(e, dict) for e in value.values())):
            raise CheckpointError(f"{path} is corrupt: {key!r} is missing or not a mapping; "
                                  f"{redo}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, or of every shard when the folder holds the
    index of a sharded checkpoint (``quantize_checkpoint`` writes those)."""
    from safetensors.torch import load_file

    from lowbit.model.shards import INDEX, TensorFiles

    if (path.parent / INDEX).is_file():
        files = TensorFiles(path.parent, CheckpointError)
        return {name: files.read(name) for name in files.names()}
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-create it")
    read_header(path, CheckpointError)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-create it") from exc


def _check_tensors(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the manifest lists is in the file, with the dtype it was saved in."""
    dtypes = manifest.get("dtypes", {})
    missing = [k for k in dtypes if k not in tensors]
    if missing:
        raise CheckpointError(f"{path / WEIGHTS} lacks {len(missing)} tensors the manifest "
                              f"lists (e.g. {missing[:3]}): the checkpoint is incomplete; "
                              "re-create it")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path / WEIGHTS}: tensor {key!r} holds NaN or Inf values: "
                                  "the file is corrupt; re-create the checkpoint")
        saved = dtypes.get(key)
        if saved is not None and str(t.dtype).removeprefix("torch.") != saved:
            raise CheckpointError(f"{path / WEIGHTS}: tensor {key!r} has dtype "
                                  f"{str(t.dtype).removeprefix('torch.')}, but the manifest "
                                  f"says {saved}: the files do not belong together; re-create "
                                  "the checkpoint")


def _skeleton(manifest: dict, build=None) -> nn.Module:
    """The architecture ``hf_config`` describes, with random weights; ``build(config, cls)``
    instead builds it otherwise (``lazy_model.meta_skeleton``: on the meta device)."""
    config = manifest.get("hf_config")
    if not config:
        raise CheckpointError("this checkpoint holds a custom nn.Module; pass the architecture: "
                              "lowbit.load(dir, model=an_instance_of_it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
    except Exception as exc:  # transformers validates config fields with its own error types
        raise CheckpointError(f"the checkpoint's hf_config cannot be rebuilt ({exc!s:.160}); "
                              "upgrade transformers, or pass the architecture: "
                              "lowbit.load(dir, model=...)") from exc
    auto = AutoModelForCausalLM if manifest.get("model_class", "").endswith("ForCausalLM") \
        else AutoModel
    if build is not None:
        return build(cfg, auto._model_mapping[type(cfg)])
    # built on the CPU (not the meta device) so non-persistent buffers such as rotary
    # frequencies are computed as the architecture defines them
    return auto.from_config(cfg)


def load(directory: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model without re-quantizing (``model``: architecture for custom
    modules; it is modified in place)."""
    path = Path(directory)
    manifest = read_manifest(path)
    tensors = _read_tensors(path / WEIGHTS)
    _check_tensors(path, manifest, tensors)
    for alias, key in manifest.get("aliases", {}).items():
        if key not in tensors:
            raise CheckpointError(f"{path / WEIGHTS} lacks {key!r} (shared with {alias!r}): "
                                  "the checkpoint is incomplete; re-create it")
        tensors[alias] = tensors[key]
    model = model if model is not None else _skeleton(manifest)
    for name, entry in manifest["quantized"].items():
        try:
            _load_quantized(model, name, entry, tensors)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, LowbitError) as exc:
            raise CheckpointError(
                f"{path}: layer {name!r} does not match its manifest entry ({exc!r:.300}); the "
                "checkpoint is corrupt or its files do not belong together: re-create it"
            ) from exc
    quantized_keys = {k for k in model.state_dict() if any(
        k.startswith(f"{n}.") for n in manifest["quantized"])}
    rest = {k: v for k, v in tensors.items() if k not in quantized_keys}
    _load_rest(model, rest, skip=quantized_keys)
    if manifest.get("recipe"):
        model.lowbit_recipe = Recipe.from_dict(manifest["recipe"])
    model.lowbit_spec = manifest.get("source")
    model.eval()
    return model


def _load_quantized(model: nn.Module, name: str, entry: dict,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Replace layer ``name`` of ``model`` by the quantized module its entry describes."""
    prefix = f"{name}." if name else ""
    spec = WeightSpec(**entry["weight"])
    own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
           and "." not in k[len(prefix):]}
    if entry.get("kind") == "conv2d":
        _set_child(model, name, QuantizedConv2d.from_manifest(entry, own))
        return
    current = model.get_submodule(name)
    shape = (entry.get("out_features"), entry.get("in_features"))
    if isinstance(current, nn.Linear) and (current.out_features, current.in_features) != shape:
        raise CheckpointError(f"layer {name!r} is {shape[0]}x{shape[1]} in the checkpoint but "
                              f"{current.out_features}x{current.in_features} in the architecture "
                              "its hf_config builds: the manifest is corrupt or belongs to "
                              "another model; re-create the checkpoint")
    missing = [k for k in ("qdata", "scale") if k not in own]
    if missing:
        raise CheckpointError(f"{name}: {' and '.join(missing)} missing from {WEIGHTS}; the "
                              "file is incomplete: re-create the checkpoint")
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
            if value.shape != target.shape:
                raise CheckpointError(f"tensor {key!r} has shape {list(value.shape)} in the "
                                      f"checkpoint but {list(target.shape)} in the model: the "
                                      "checkpoint does not match this architecture or is corrupt")
            if isinstance(target, nn.Parameter):
                target.data = value.to(target.device)
            else:
                parent_name, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                parent._buffers[child] = value
