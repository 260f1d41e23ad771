"""Checks of a Hugging Face model folder before transformers reads it: config.json, the shard
index and every safetensors header, each failing with an error that names the file and the fix
(instead of transformers' own exception, or a crash in a reader)."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.model.safetensors_header import read_header


def check_hf_folder(path: Path, error: type[Exception]) -> None:
    """Raise ``error`` (a ``LowbitError`` subclass) for the first damaged file of ``path``."""
    _check_config(path, error)
    _check_shard_index(path, error)
    for file in sorted(path.glob("*.safetensors")):
        read_header(file, error)


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


def _check_shard_index(path: Path, error: type[Exception]) -> None:
    """A sharded folder's ``model.safetensors.index.json`` parses and names shards that exist."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise error(f"{index} is corrupt ({exc!r:.120}): it must be JSON with a "
                    "'weight_map'; restore it from the model's source") from exc
    missing = sorted(s for s in shards if not (path / str(s)).is_file())
    if missing:
        raise error(f"{index} names shards that are not in the folder: {missing[:3]}; "
                    "the download is incomplete: fetch the missing files")
