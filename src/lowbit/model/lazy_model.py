"""A model whose weights stay in their files until a part of it is needed.

``LazyModel.open(folder)`` builds the architecture of a Hugging Face folder (config.json +
safetensors shards) on the ``meta`` device: every module and shape, no weight memory. Its
non-persistent buffers (rotary frequencies) are computed on the CPU, as ``from_pretrained``
computes them. ``materialize(paths)`` reads the float weights of those submodules from the
files (float32, plain reads: ``shards.TensorFiles``) and ``evict(paths)`` puts them back on
``meta`` (a quantized linear becomes a meta ``nn.Linear`` again), so the process holds one
part at a time. A weight tied to another (``lm_head`` to the embedding) is read from
whichever name the files hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.model.shards import ShardError, TensorFiles
from lowbit.model.targets import _set_module
from lowbit.nn import QuantizedConv2d, QuantizedLinear


def meta_skeleton(config, cls) -> nn.Module:
    """``cls(config)`` with its parameters on ``meta`` and its non-persistent buffers
    computed on the CPU (transformers' own ``_init_weights`` recomputes rotary tables)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with torch.device("meta"), no_init_weights():
        model = cls(config)
    for module in model.modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for k in meta:
            module._buffers[k] = torch.empty_like(module._buffers[k], device="cpu")
        if not meta_skeleton_persistent(module, meta) and hasattr(model, "_init_weights"):
            model._init_weights(module)
    return model.eval()


def meta_skeleton_persistent(module: nn.Module, names: list[str]) -> bool:
    """Whether any of ``names`` is a persistent buffer (read from the files instead)."""
    return any(k not in module._non_persistent_buffers_set for k in names)


class LazyModel:
    """``model`` (on ``meta``) and the files its weights come from: a Hugging Face folder
    (``open``; floats read as float32), or a lowbit checkpoint (``open_checkpoint``; tensors
    in their saved dtypes, quantized layers rebuilt from their manifest entries)."""

    def __init__(self, model: nn.Module, files: TensorFiles, folder: Path,
                 manifest: dict | None = None):
        self.model, self.files, self.folder = model, files, folder
        self.manifest = manifest
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        if manifest is not None:
            tied = dict(manifest.get("aliases", {}))
        self.tied = {k: v for k, v in tied.items() if isinstance(v, str)}
        self.quantized = dict(manifest["quantized"]) if manifest is not None else {}
        quantized_keys = {k for k in model.state_dict() if k.rpartition(".")[0] in self.quantized}
        missing = [k for k in model.state_dict() if self.file_name(k) is None
                   and k not in quantized_keys]
        if missing:
            raise ShardError(
                f"{folder}: the safetensors files lack {len(missing)} tensors "
                f"{type(model).__name__} needs (e.g. {missing[:3]}): the files are incomplete "
                "or belong to another model; restore the folder from its source")

    @classmethod
    def open(cls, folder: str | os.PathLike) -> LazyModel:
        """The architecture of Hugging Face folder ``folder``, weights left in the files."""
        from lowbit.model.hf_folder import check_hf_folder
        from lowbit.model.loaders import _model_class, _offline_transformers

        path = Path(folder)
        transformers = _offline_transformers()
        check_hf_folder(path, ShardError)
        files = TensorFiles(path, ShardError)
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=False)
        model = meta_skeleton(config, _model_class(transformers, config))
        model.lowbit_spec = os.fspath(folder)
        return cls(model, files, path)

    @classmethod
    def open_checkpoint(cls, folder: str | os.PathLike) -> LazyModel:
        """A lowbit checkpoint (``save`` or ``quantize_checkpoint``), weights left in files."""
        from lowbit.model.serialization import CheckpointError, read_manifest
        from lowbit.model.serialization import _skeleton as skeleton_of

        path = Path(folder)
        manifest = read_manifest(path)
        files = TensorFiles(path, CheckpointError)
        model = skeleton_of(manifest, build=meta_skeleton)
        model.lowbit_spec = manifest.get("source")
        return cls(model, files, path, manifest)

    def file_name(self, key: str) -> str | None:
        """The name under which the files hold state-dict entry ``key`` (or None)."""
        if key in self.files:
            return key
        other = self.tied.get(key)
        return other if other is not None and other in self.files else None

    def keys(self, path: str, whole: bool = True) -> list[str]:
        """State-dict keys of submodule ``path``: its whole subtree, or (``whole=False``)
        only the tensors it holds itself."""
        module = self.model.get_submodule(path)
        prefix = f"{path}." if path else ""
        return [prefix + k for k in module.state_dict(keep_vars=True)
                if whole or "." not in k]

    def float32_bytes(self, paths: list[str], whole: bool = True) -> int:
        """Bytes the weights of ``paths`` take once read (floats as float32)."""
        return sum(self.files.nbytes(self.file_name(k), as_float32=True)
                   for p in paths for k in self.keys(p, whole))

    @torch.no_grad()
    def materialize(self, paths: list[str], whole: bool = True) -> None:
        """Read the weights of submodules ``paths`` from the files (module docstring)."""
        from lowbit.model.serialization import _load_quantized

        source = self.manifest is None
        for path in paths:
            module = self.model.get_submodule(path)
            start = len(path) + 1 if path else 0
            mine = [n for n in self.quantized
                    if n == path or (whole and n.startswith(f"{path}."))]
            keys = [k for k in self.keys(path, whole) if k.rpartition(".")[0] not in mine]
            state = {k[start:]: self.files.read(self.file_name(k), float32=source)
                     for k in keys}
            module.load_state_dict(state, strict=whole and not mine, assign=True)
            for name in mine:
                own = {k: self.files.read(k) for k in self.files.names()
                       if k.startswith(f"{name}.") and "." not in k[len(name) + 1:]}
                _load_quantized(self.model, name, self.quantized[name], own)

    @torch.no_grad()
    def evict(self, paths: list[str], whole: bool = True) -> None:
        """Put the weights of ``paths`` back on ``meta``, quantized layers as meta linears."""
        for path in paths:
            module = self.model.get_submodule(path)
            children = list(module.named_modules()) if whole else [("", module)]
            for name, child in children:
                if isinstance(child, (QuantizedLinear, QuantizedConv2d)):
                    _set_module(self.model, f"{path}.{name}" if name else path, nn.Linear(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        device="meta"))
                    continue
                for k, p in child._parameters.items():
                    if p is not None and not p.is_meta:
                        child._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                            requires_grad=p.requires_grad)
                for k, b in child._buffers.items():
                    if b is not None and not b.is_meta and k not in \
                            child._non_persistent_buffers_set:
                        child._buffers[k] = torch.empty_like(b, device="meta")
