"""Checks of a Hugging Face model folder before transformers reads it: config.json, the shard
index and every safetensors header, each failing with an error that names the file and the fix
(instead of transformers' own exception, or a crash in a reader)."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.model.shards import TensorFiles


def check_hf_folder(path: Path, error: type[Exception]) -> None:
    """Raise ``error`` (a ``LowbitError`` subclass) for the first damaged file of ``path``:
    config.json, then the shard index, every safetensors header and their agreement
    (``shards.TensorFiles``)."""
    _check_config(path, error)
    TensorFiles(path, error)


def _check_config(path: Path, error: type[Exception]) -> None:
    """config.json must be a JSON object naming a ``model_type`` transformers knows."""
    from transformers import CONFIG_MAPPING

    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file} is not valid JSON ({exc}); restore it from the model's "
                    "source (save_pretrained writes it)") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise error(f"{file} is not a Hugging Face model config (a JSON object with a "
                    "'model_type' key); restore it from the model's source")
    if config["model_type"] not in CONFIG_MAPPING:
        raise error(f"{file}: model_type {config['model_type']!r} is not an "
                    "architecture this transformers knows; upgrade transformers or "
                    "check the config")
