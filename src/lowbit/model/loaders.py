"""Load a model (and its tokenizer) from a bundled name, a Hugging Face folder, a GGUF file or
an ``nn.Module``, without a model hub and without unpickling anything.

``transformers`` is imported inside the functions, so ``import lowbit`` stays light.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.hf_folder import check_hf_folder
from lowbit.model.hub import BUNDLED, bundled_path
from lowbit.model.safetensors_header import is_pickle, read_header
from lowbit.model.shards import read_into

__all__ = ["ModelLoadError", "load_model", "load_tokenizer", "resolve_spec"]

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


class ModelLoadError(LowbitError, ValueError):
    """A model spec could not be resolved or loaded; the message names the fix."""


def _bundled_list() -> str:
    return "; ".join(f"{name} ({info.description})" for name, info in BUNDLED.items())


def _refuse_pickle(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a pickle-based checkpoint ({path.suffix}); lowbit never unpickles files, "
        "because unpickling can run arbitrary code. Convert it to safetensors once, in a "
        "process you trust (e.g. `model.save_pretrained(dir, safe_serialization=True)` or "
        "`safetensors.torch.save_file(state_dict, 'model.safetensors')`), and pass the folder "
        "with config.json and model.safetensors, or pass the nn.Module itself."
    )


def resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, Path]:
    """Classify ``spec`` as ``("gguf", file)``, ``("hf", folder)`` or ``("lowbit", folder)``
    (a checkpoint written by ``lowbit.save``); fetch bundled models.

    Raises ``ModelLoadError`` for pickle files, unknown names and unsupported paths.
    """
    text = os.fspath(spec)
    if text in BUNDLED:
        path = bundled_path(text)
        if BUNDLED[text].kind == "gguf":
            return "hf", _converted_dir(path)
        return "hf", path
    path = Path(text).expanduser()
    if not path.exists():
        from lowbit.model.serialization import recover

        recover(path)  # a checkpoint that a killed `save --overwrite` had moved aside
    if not path.exists():
        hint = ""
        if "/" in text and not text.startswith((".", "/", "~")):
            hint = " lowbit never downloads from a model hub: download the folder yourself."
        raise ModelLoadError(
            f"unknown model {text!r}: not a bundled name and no such file or folder.{hint} "
            f"Pass a bundled name ({_bundled_list()}), a Hugging Face model folder "
            "(config.json + *.safetensors), a .gguf file, or an nn.Module."
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        if suffix == ".gguf":
            return "gguf", path
        if suffix == ".safetensors" or path.name == "config.json":
            if suffix == ".safetensors" and is_pickle(path):
                raise _refuse_pickle(path)
            raise ModelLoadError(
                f"{path} is a single file; pass the folder that holds config.json and the "
                "*.safetensors weights (the architecture comes from config.json)."
            )
        raise ModelLoadError(
            f"{path}: unsupported file type {suffix or '(none)'}; pass a .gguf file or a "
            "Hugging Face model folder."
        )
    if (path / "manifest.json").is_file():  # a lowbit checkpoint (lowbit.save)
        return "lowbit", path
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        extra = f" It holds GGUF files; pass one: {[str(g) for g in ggufs]}." if ggufs else ""
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model "
                             f"folder.{extra}")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise _refuse_pickle(path / pickles[0])
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights.")
    return "hf", path


def _offline_transformers() -> Any:
    """Import transformers with the hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelLoadError(
            "loading Hugging Face or GGUF models needs transformers: "
            "pip install 'lowbit[models]'"
        ) from exc
    return transformers


def _model_class(transformers: Any, config: Any) -> Any:
    """The class named in ``config.architectures`` if transformers has it, else an Auto class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _load_hf_dir(path: Path) -> nn.Module:
    transformers = _offline_transformers()
    check_hf_folder(path, ModelLoadError)
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
        cls = _model_class(transformers, config)
        model, info = cls.from_pretrained(
            path, config=config, local_files_only=True, use_safetensors=True,
            trust_remote_code=False, dtype=torch.float32, output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, MemoryError) as exc:
        if isinstance(exc, MemoryError) or "Cannot allocate memory" in str(exc):
            raise ModelLoadError(f"{path} does not fit in this process's memory ({exc}): "
                                 "quantize it block by block with `lowbit quantize "
                                 f"{path} --stream` (lowbit.quantize_checkpoint)") from exc
        raise ModelLoadError(f"could not build the model in {path}: {exc}. The weights do not "
                             "match config.json (shapes, names) or a file is damaged: restore "
                             "the folder from the model's source") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values
        extra = sorted(info.get("unexpected_keys") or [])
        raise ModelLoadError(
            f"{path}: the weights lack {len(missing)} tensors {cls.__name__} needs (e.g. "
            f"{missing[:3]}){f', and hold unexpected ones {extra[:3]}' if extra else ''}: the "
            "files are damaged or belong to another model; restore the folder from its source")
    return _into_process_memory(model, path)


def _safetensors_index(folder: Path) -> dict[str, tuple[Path, int, str, tuple[int, ...]]]:
    """``name -> (file, byte offset, dtype, shape)`` from the JSON headers of a folder's
    safetensors files (8-byte little-endian header length, then the header)."""
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        header, start = read_header(file, ModelLoadError)
        for name, meta in header.items():
            if name != "__metadata__":
                index[name] = (file, start + meta["data_offsets"][0], meta["dtype"],
                               tuple(meta["shape"]))
    return index


def _read_into(file: Path, offset: int, out: np.ndarray) -> None:
    read_into(file, offset, out, ModelLoadError)


@torch.no_grad()
def _into_process_memory(model: nn.Module, folder: Path) -> nn.Module:
    """Give every weight its own storage in process memory, read from the files with plain
    reads, not through the safetensors mapping ``from_pretrained`` leaves them in.

    Mapped pages stay resident while any tensor of the file lives (the embedding, a norm),
    so a layer that ``quantize`` replaces would keep its FP32 pages for the life of the
    process; and copying through the mapping would hold both copies at once. Read into
    fresh tensors, the FP32 weights of each replaced layer are freed as soon as its packed
    codes exist. A tensor the files do not hold as float32 of the same shape and values
    (spot-checked at both ends) is cloned instead (``from_pretrained`` converted it)."""
    index = _safetensors_index(folder)
    seen: set[int] = set()
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        entry = index.get(name)
        fresh = None
        if entry and entry[2] == "F32" and entry[3] == tuple(t.shape) and t.dtype == torch.float32:
            fresh = torch.empty(t.shape, dtype=torch.float32)
            _read_into(entry[0], entry[1], fresh.numpy().reshape(-1).view(np.uint8))
            flat, mine = fresh.reshape(-1), t.data.reshape(-1)
            if not (torch.equal(flat[:256], mine[:256]) and torch.equal(flat[-256:], mine[-256:])):
                fresh = None
        t.data = fresh if fresh is not None else t.data.clone()
    return model


def _check_gguf_header(path: Path) -> tuple[int, int]:
    from lowbit.model.gguf_header import check_gguf

    return check_gguf(path, ModelLoadError)


def _load_gguf(path: Path) -> nn.Module:
    """Dequantize a GGUF file into the matching transformers causal-LM class, in FP32.

    Uses transformers' GGUF reader (``load_gguf_checkpoint``, built on the ``gguf`` package)
    directly rather than ``from_pretrained(gguf_file=...)``, which additionally requires
    ``accelerate``.
    """
    counts = _check_gguf_header(path)
    transformers = _offline_transformers()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from lowbit.model.gguf_header import check_size

    fix = ("The file is truncated or corrupt, or its architecture is not supported by "
           "transformers' GGUF reader: fetch it again (for a bundled model delete it from "
           "the lowbit cache) or convert the model to a Hugging Face folder.")
    try:
        config = transformers.AutoConfig.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # the gguf reader raises many types on bad files
        raise ModelLoadError(f"could not read the GGUF metadata of {path}: {exc}. {fix}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{path}: GGUF architecture {config.model_type!r} is not a causal "
                             "LM that transformers can build.")
    check_size(path, config, counts, ModelLoadError)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensors = load_gguf_checkpoint(
                str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
            )["tensors"]
    except Exception as exc:
        raise ModelLoadError(f"could not read the tensors of {path}: {exc}. {fix}") from exc
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the metadata
        raise ModelLoadError(f"{path}: GGUF tensors do not fit the model its metadata describes "
                             f"({str(exc).strip()[:300]}). {fix}") from exc
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{path}: GGUF tensors do not match {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}. {fix}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _converted_dir(gguf_path: Path) -> Path:
    """A bundled GGUF, dequantized once to an FP32 Hugging Face folder beside it.

    Reading the GGUF costs tens of seconds (its 49k-token vocabulary is parsed field by field,
    twice); the converted folder (config.json, model.safetensors, tokenizer.json) loads in a
    few. Written to a temporary folder and renamed when complete.
    """
    import tempfile

    target = gguf_path.parent / "hf-fp32"
    if (target / "config.json").is_file():
        return target
    print(f"lowbit: converting {gguf_path.name} to an FP32 safetensors folder (once) ...",
          file=sys.stderr, flush=True)
    model = _load_gguf(gguf_path)
    tokenizer = _cached_tokenizer("gguf", str(gguf_path.resolve()))
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=gguf_path.parent) as tmp:
        staging = Path(tmp) / "hf-fp32"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    return target


def load_model(spec: str | os.PathLike[str] | nn.Module) -> nn.Module:
    """Load a model for quantization.

    ``spec`` is one of: a bundled name (see ``lowbit.model.hub.BUNDLED``); a lowbit checkpoint
    folder (``lowbit.save``; rebuilt by ``lowbit.load``, quantized as saved); a Hugging Face model
    folder (config.json + safetensors; the class named in ``architectures`` is used, so causal
    LMs get their LM head and ``BertModel`` stays an encoder); a ``.gguf`` file (dequantized to
    FP32 into the matching transformers causal-LM class); or an ``nn.Module``, returned as is
    (only ``lowbit_spec`` is added if missing).

    Returns the module in eval mode, float32, with ``model.lowbit_spec`` set to ``str(spec)``.
    Pickle checkpoints are refused; nothing is fetched from a model hub.
    """
    if isinstance(spec, nn.Module):
        if not hasattr(spec, "lowbit_spec"):
            spec.lowbit_spec = f"<{type(spec).__name__}>"
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"load_model expects a bundled name, a path or an nn.Module, got {type(spec).__name__}"
        )
    kind, path = resolve_spec(spec)
    if kind == "lowbit":  # already quantized: rebuilt as saved, dtypes kept
        from lowbit.model.serialization import load

        return load(path)
    model = _load_gguf(path) if kind == "gguf" else _load_hf_dir(path)
    model = model.to(torch.float32).eval()
    model.lowbit_spec = os.fspath(spec)
    return model


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(kind: str, path: str) -> Any:
    transformers = _offline_transformers()
    p = Path(path)
    if kind == "gguf":
        _check_gguf_header(p)
        try:
            return transformers.AutoTokenizer.from_pretrained(
                p.parent, gguf_file=p.name, local_files_only=True
            )
        except Exception as exc:
            raise ModelLoadError(f"could not build a tokenizer from {p}: {exc}") from exc
    if kind == "lowbit" and not (p / "tokenizer_config.json").is_file():
        return _checkpoint_source_tokenizer(p)
    try:
        return transformers.AutoTokenizer.from_pretrained(
            p, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {p}: {exc}. The folder needs tokenizer.json "
            "(or the slow tokenizer's vocabulary files) next to config.json."
        ) from exc


def _checkpoint_source_tokenizer(folder: Path) -> Any:
    """The tokenizer of the model a checkpoint was made from (saved without one)."""
    from lowbit.model.serialization import read_manifest

    source = read_manifest(folder).get("source")
    if not source or source.startswith("<"):
        raise ModelLoadError(
            f"{folder} holds no tokenizer files and names no source model; save it with "
            "lowbit.save(model, dir, tokenizer=tok), or pass the tokenizer yourself.")
    return load_tokenizer(source)


def load_tokenizer(spec: str | os.PathLike[str] | nn.Module) -> Any:
    """The Hugging Face tokenizer that belongs to ``spec`` (same forms as ``load_model``).

    For an ``nn.Module``, its ``lowbit_spec`` (set by ``load_model``) is used. Tokenizers are
    cached per resolved path within the process, so treat the returned object as shared.
    """
    if isinstance(spec, nn.Module):
        inner = getattr(spec, "lowbit_spec", None)
        if inner is None or inner.startswith("<"):
            raise ModelLoadError(
                f"no tokenizer known for this {type(spec).__name__}: pass a tokenizer, or load "
                "the model with lowbit.load_model(spec) so it remembers where it came from."
            )
        spec = inner
    kind, path = resolve_spec(spec)
    return _cached_tokenizer(kind, str(path.resolve()))
