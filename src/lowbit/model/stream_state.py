"""The folder a streamed quantization writes into until it is complete, and resumes from.

``.NAME.partial`` beside the output ``NAME`` (a name ``lowbit.load`` refuses: it holds no
manifest until the end) holds one safetensors file per finished unit, ``state.json`` (which
units are finished, what each wrote, and the settings of the run) and, after each finished
block of a calibrated run, the calibration inputs of the next block exactly as held
(``held-<unit>.safetensors``). Each file is written under a temporary name and renamed, and
``state.json`` last, so a run killed at any point resumes from the last unit it lists, with
the same inputs: the result equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.model.calib_memory import ScaledHalf

STATE = "state.json"


class ResumeError(LowbitError, ValueError):
    """An interrupted run that cannot be continued as asked; the message names the fix."""


def partial_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


class PartialRun:
    """``state.json`` and the files of an unfinished streamed run (module docstring)."""

    def __init__(self, target: Path, settings: dict, resume: bool):
        self.folder = partial_folder(target)
        self.settings = json.loads(json.dumps(settings, default=str))
        state_file = self.folder / STATE
        if state_file.is_file():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            done = len(state.get("units", {}))
            if not resume:
                raise ResumeError(
                    f"{self.folder} holds an interrupted run of {target} ({done} parts "
                    "finished): pass --resume (resume=True) to continue it, or delete that "
                    "folder to start over")
            if state.get("settings") != self.settings:
                changed = sorted(k for k in set(state.get("settings", {})) | set(self.settings)
                                 if state.get("settings", {}).get(k) != self.settings.get(k))
                raise ResumeError(
                    f"{self.folder} was started with other settings ({', '.join(changed)} "
                    "differ): resume with the same model, recipe and calibration data, or "
                    "delete that folder to start over")
            self.state = state
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.state = {"settings": self.settings, "units": {}, "held": None, "extra": {}}

    @property
    def resumed(self) -> int:
        """Units finished by an earlier run (0 for a fresh one)."""
        return len(self.state["units"])

    def done(self, unit: int) -> dict | None:
        """What unit ``unit`` wrote (its manifest part), or None when it is not finished."""
        return self.state["units"].get(str(unit))

    @property
    def extra(self) -> dict:
        """Values of the run kept across a resume (e.g. the branch split), JSON only."""
        return self.state["extra"]

    def finish(self, unit: int, record: dict, held: dict[str, list] | None) -> None:
        """Mark ``unit`` finished (its file is already in place) with ``record``, and keep
        ``held`` (lists of held calibration inputs) for the next block."""
        old = self.state.get("held")
        name = None
        if held is not None:
            name = f"held-{unit:05d}.safetensors"
            _write_held(self.folder / name, held)
        self.state["units"][str(unit)] = record
        if held is not None:
            self.state["held"] = name
        tmp = self.folder / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, default=str))
        os.replace(tmp, self.folder / STATE)
        if old and old != self.state["held"]:
            (self.folder / old).unlink(missing_ok=True)

    def held(self) -> dict[str, list] | None:
        """The held calibration inputs after the last finished block, as ``finish`` got them."""
        name = self.state.get("held")
        return None if name is None else _read_held(self.folder / name)

    def clean(self) -> None:
        """Remove the run's own files before the folder becomes the checkpoint."""
        for path in [self.folder / STATE, *self.folder.glob("held-*.safetensors")]:
            path.unlink(missing_ok=True)


def _write_held(path: Path, held: dict[str, list]) -> None:
    from safetensors.torch import save_file

    tensors, layout = {}, {}
    for key, entries in held.items():
        layout[key] = len(entries)
        for i, h in enumerate(entries):
            if isinstance(h, ScaledHalf):
                tensors[f"{key}.{i}.half"], tensors[f"{key}.{i}.scale"] = h.half, h.scale
            else:
                tensors[f"{key}.{i}"] = h
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"layout": json.dumps(layout)})
    os.replace(tmp, path)


def _read_held(path: Path) -> dict[str, list]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
    tensors = load_file(str(path))
    held: dict[str, list] = {}
    for key, count in layout.items():
        entries: list[torch.Tensor | ScaledHalf] = []
        for i in range(count):
            if f"{key}.{i}.half" in tensors:
                entries.append(ScaledHalf(tensors[f"{key}.{i}.half"],
                                          tensors[f"{key}.{i}.scale"]))
            else:
                entries.append(tensors[f"{key}.{i}"])
        held[key] = entries
    return held
