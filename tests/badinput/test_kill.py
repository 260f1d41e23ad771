"""``kill -9`` of ``lowbit quantize ... -o DIR --overwrite`` while it writes: the previous
checkpoint under DIR survives (loadable, same tensors) and no half-written one takes its name.
The crash states between the two renames of a replacement are built on disk and recovered."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.model import serialization


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A Llama with about 4 MB of w8 codes, so that its save takes a few tens of ms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("big")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _mid_write(parent: Path, name: str) -> Path | None:
    """The temporary folder of a save in progress (renamed to ``name`` when complete)."""
    return next(parent.glob(f".{name}.*.tmp"), None)


def test_kill_mid_write_keeps_previous_checkpoint(big_dir, tmp_path):
    out = tmp_path / "ckpt"
    model = _small_checkpoint(out, "w4g32")  # the previous checkpoint under that name
    before = _digest(out)
    exe = Path(sys.executable).with_name("lowbit")
    for _ in range(5):  # a save that finishes between the poll and the kill is tried again
        proc = subprocess.Popen([str(exe), "quantize", str(big_dir), "-r", "w8", "-o",
                                 str(out), "--overwrite", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen, deadline = None, time.monotonic() + 120
        while seen is None and proc.poll() is None and time.monotonic() < deadline:
            seen = _mid_write(tmp_path, out.name)
            time.sleep(0.001)  # a poll per ms: the save takes tens of ms, the CPU is shared
        if seen is not None:
            # freeze the save, then kill it only if it is still writing (the temp folder
            # exists and the old checkpoint still holds the name); a save that got past that
            # between the poll and the stop is let finish and tried again
            os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc.pid)
            if seen.exists() and out.exists():
                os.kill(proc.pid, signal.SIGKILL)
            else:
                seen = None
            os.kill(proc.pid, signal.SIGCONT)
        err = proc.communicate(timeout=60)[1].decode()
        if proc.returncode == -signal.SIGKILL:
            break
        assert proc.returncode == 0, err
        assert lowbit.load(out).lowbit_recipe.name == "w8"  # completed: whole, not torn
        shutil.rmtree(out)
        model = _small_checkpoint(out, "w4g32")
        before = _digest(out)
    assert seen is not None, f"the save was never caught mid-write (exit {proc.returncode}): {err}"
    assert proc.returncode == -signal.SIGKILL
    # the old checkpoint is untouched, loads, and holds the same tensors
    assert _digest(out) == before
    loaded = lowbit.load(out)
    assert loaded.lowbit_recipe.name == "w4g32"
    ids = torch.randint(0, 128, (1, 16))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not (tmp_path / f".{out.name}.old").exists()
    # the killed save's temp folder is left; the next save to that name removes it
    assert list(tmp_path.glob(f".{out.name}.*.tmp"))
    lowbit.save(model, out, overwrite=True)
    assert not list(tmp_path.glob(f".{out.name}.*")), list(tmp_path.iterdir())


def _wait_stopped(pid: int) -> None:
    """Until the kernel reports ``pid`` stopped (or gone): a SIGSTOP is not taken at once."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in "TtZX":
            return
        time.sleep(0.0005)


def _small_checkpoint(path: Path, recipe: str):
    from ..model.tiny import tiny_llama

    model = tiny_llama()
    lowbit.quantize(model, recipe, progress=False)
    lowbit.save(model, path)
    return model


def test_crash_between_renames_is_recovered(tmp_path):
    """Killed after moving the old checkpoint aside, before renaming the new one in."""
    out = tmp_path / "ckpt"
    _small_checkpoint(out, "w8")
    before = _digest(out)
    out.rename(tmp_path / ".ckpt.old")  # the state such a crash leaves
    assert lowbit.load(out).lowbit_recipe.name == "w8"  # load puts it back
    assert _digest(out) == before and not (tmp_path / ".ckpt.old").exists()
    out.rename(tmp_path / ".ckpt.old")
    assert lowbit.load_model(out).lowbit_recipe.name == "w8"  # so does load_model (the CLI)
    assert _digest(out) == before

    out.rename(tmp_path / ".ckpt.old")
    model = _small_checkpoint(tmp_path / "other", "w4g32")
    with pytest.raises(serialization.CheckpointError, match="overwrite"):
        lowbit.save(model, out)  # save also puts it back first, so it still refuses
    assert _digest(out) == before
    lowbit.save(model, out, overwrite=True)
    assert lowbit.load(out).lowbit_recipe.name == "w4g32"
    assert not list(tmp_path.glob(".ckpt*"))


def test_crash_after_swap_keeps_new(tmp_path):
    """Killed after the new checkpoint was renamed in, before the old copy was deleted."""
    out = tmp_path / "ckpt"
    _small_checkpoint(out, "w4g32")
    _small_checkpoint(tmp_path / ".ckpt.old", "w8")
    assert lowbit.load(out).lowbit_recipe.name == "w4g32"
    model = _small_checkpoint(tmp_path / "other", "w8")
    lowbit.save(model, out, overwrite=True)
    assert not list(tmp_path.glob(".ckpt*"))
