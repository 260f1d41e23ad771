"""What several commands share: open a model or a checkpoint folder, with its tokenizer."""

from __future__ import annotations

import sys

import torch


def open_model(spec: str, recipe: str | None = None, calibration: str | None = None,
               progress: bool = True):
    """(model, tokenizer) for a bundled name, HF folder, GGUF file or lowbit checkpoint;
    quantized with ``recipe`` first when one is given."""
    from lowbit.model import load_model, load_tokenizer, quantize

    model = load_model(spec)
    tokenizer = load_tokenizer(spec)
    if recipe:
        from lowbit.model import Recipe

        r = Recipe.parse(recipe)
        calib = (calibration_batches(tokenizer, calibration, model=model)
                 if r.needs_calibration else None)
        quantize(model, r, calib, progress=progress)
    return model, tokenizer


def unquantized_source(spec: str, recipe: str | None) -> tuple[str, str | None]:
    """For commands that quantize a float model themselves (sensitivity, bench): a lowbit
    checkpoint stands for the model it was made from, with its recipe unless ``recipe`` is
    given. Anything else is returned as is."""
    from pathlib import Path

    from lowbit.model.serialization import MANIFEST, read_manifest

    if not (Path(spec) / MANIFEST).is_file():
        return spec, recipe
    manifest = read_manifest(spec)
    source = manifest.get("source")
    if not source or source.startswith("<"):
        from lowbit.model import CheckpointError

        raise CheckpointError(f"{spec} does not name the model it was made from; pass that "
                              "unquantized model instead")
    saved = (manifest.get("recipe") or {}).get("name")
    chosen = recipe or saved
    print(f"lowbit: {spec} is a checkpoint of {source} ({saved}); measuring {source} with "
          f"{chosen}", file=sys.stderr)
    return source, chosen


#: tokens in one calibration window (the ``seq_len`` of ``calibration_batches``)
CALIBRATION_WINDOW = 512


def calibration_batches(tokenizer, source: str | None, tokens: int = 16384,
                        seq_len: int = CALIBRATION_WINDOW, model=None):
    """``tokens`` of ``source`` (a file, a built-in name, ``generated`` or a mix such as
    ``default+my.txt@0.25``), by default the ``"default"`` mix of pydoc, stdlib docstrings
    and stdlib code (``lowbit.data.sources``). ``model``: for ``generated`` windows."""
    from lowbit.data import DEFAULT_CALIBRATION, text

    return text(source or DEFAULT_CALIBRATION, tokenizer, tokens=tokens, seq_len=seq_len,
                model=model)


def add_ray_argument(p, cells: str) -> None:
    """``--ray [ADDRESS]`` (bench, sensitivity): the independent cells as Ray tasks."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run the {cells} as Ray tasks: on a local Ray cluster, or on the "
                        "cluster at ADDRESS (HOST:PORT); default $LOWBIT_RAY, else serially. "
                        "Needs pip install 'lowbit[distributed]'")


def set_threads(n: int | None) -> None:
    """``--threads N``; 0 or None keep torch's default."""
    if n is not None and n < 0:
        from lowbit.errors import LowbitError

        raise LowbitError(f"--threads must be a positive number of threads, got {n}")
    if n:
        torch.set_num_threads(n)
