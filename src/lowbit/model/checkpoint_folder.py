"""A checkpoint folder on disk: its file names, ``CheckpointError``, and atomic writes.

Writes go to a temporary folder beside the target, renamed into place when complete, so a
crash never leaves a half-written checkpoint under the final name. Replacing a checkpoint moves
the old one aside (``.NAME.old``) until the new one is in place; if a crash strikes between the
two renames, the next ``save`` or ``load`` of that name puts the old one back. Exporters write
their folders the same way (``swap_in``, ``remove_stale_temps``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(LowbitError, ValueError):
    """A checkpoint folder that cannot be written or read; the message says why."""


def check_target(directory: str | os.PathLike, overwrite: bool) -> Path:
    """The folder ``save`` may write: refuses an existing one without ``overwrite``, and even
    with it anything but a lowbit checkpoint or an empty folder, so that ``--overwrite`` never
    deletes a model's own files. The CLI calls it before the work starts."""
    target = Path(directory)
    recover(target)
    if not target.exists():
        above = next(p for p in target.parents if p.exists())
        if not above.is_dir():
            raise CheckpointError(f"cannot write {target}: {above} is a file, not a folder; "
                                  "choose another output folder")
        return target
    if not overwrite:
        raise CheckpointError(f"{target} already exists; choose another folder or pass "
                              f"overwrite=True (CLI: --overwrite)")
    if not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file()):
        what = "a folder without manifest.json" if target.is_dir() else "a file"
        raise CheckpointError(f"{target} is not a lowbit checkpoint ({what}); overwrite only "
                              "replaces a checkpoint, so a model's own files are never deleted: "
                              "choose another folder, or remove it yourself")
    return target


def swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing any folder there: the old
    one is moved aside first (``recover`` puts it back if the process dies in between)."""
    if target.exists():
        old = _aside(target)
        _discard(old)  # left by a crash after an earlier swap: the target is newer
        target.rename(old)  # from here to the next rename, recover() can undo
        tmp.rename(target)
        _discard(old)
    else:
        tmp.rename(target)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _discard(folder: Path) -> None:
    """Delete ``folder`` after renaming it, so a half-deleted copy never keeps its name."""
    if folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".trash",
                                      dir=folder.parent))
        folder.rename(trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Put back a checkpoint that ``save(..., overwrite=True)`` had moved aside when it was
    killed before renaming the new one in (the target is missing, ``.NAME.old`` is there)."""
    target = Path(target)
    old = _aside(target)
    if old.is_dir() and not target.exists():
        old.rename(target)


def remove_stale_temps(target: Path) -> None:
    """Delete temporary files or folders (``.NAME.PID.*.tmp``) that killed writes to
    ``target`` left (their process is gone); exporters use it too."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
