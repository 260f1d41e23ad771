"""Streaming's bad input: a shard missing from the index, a shard whose header disagrees
with the index, a memory cap too small for one block. Each is a ``LowbitError`` naming the
problem and the fix; from the CLI, exit code 2 without a traceback, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit as lb
from lowbit.errors import LowbitError
from lowbit.model.shards import INDEX, ShardError
from lowbit.model.stream_memory import MemoryCapError, parse_size

from .test_streaming import _sharded_llama


@pytest.fixture
def sharded(tmp_path, tiny_tokenizer_dir) -> Path:
    return _sharded_llama(tmp_path / "src", tiny_tokenizer_dir)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _refused(proc: subprocess.CompletedProcess, *says: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    for s in says:
        assert s in proc.stderr, proc.stderr


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()


def test_a_shard_missing_from_the_folder(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ShardError, match="not in the folder.*fetch the missing files"):
        lb.quantize_checkpoint(sharded, "w4g32", tmp_path / "out", progress=False)
    _refused(_cli("quantize", sharded, "--stream", "-o", tmp_path / "out"), shard.name,
             "fetch the missing files")
    _nothing_written(tmp_path / "out")


def test_a_shard_whose_header_disagrees_with_the_index(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][name] = other  # the index says it is in a shard that lacks it
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"disagrees with {INDEX}.*{name}.*fetch both again"):
        lb.quantize_checkpoint(sharded, "w4g32", tmp_path / "out", progress=False)
    _refused(_cli("quantize", sharded, "--stream", "-o", tmp_path / "out"), "disagrees",
             name)
    _nothing_written(tmp_path / "out")
    # the in-memory loader runs the same check
    with pytest.raises(LowbitError, match="disagrees"):
        lb.load_model(sharded)


def test_a_shard_holding_a_tensor_the_index_omits(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    shards = list(index["weight_map"].values())
    dropped = next(n for n, s in index["weight_map"].items() if shards.count(s) > 1)
    del index["weight_map"][dropped]
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"does not list.*{dropped}"):
        lb.quantize_checkpoint(sharded, "w4g32", tmp_path / "out", progress=False)


def test_a_cap_too_small_for_one_block_says_what_one_block_needs(sharded, tmp_path):
    with pytest.raises(MemoryCapError, match=r"too small: one block \(.*\) needs about "
                                             r"[0-9.]+ [MG]iB.*raise --max-memory") as err:
        lb.quantize_checkpoint(sharded, "w4g32", tmp_path / "out", max_memory="1MiB",
                               progress=False)
    need = str(err.value).split("needs about ")[1].split(" (")[0]
    assert parse_size(need.replace(" ", "")) > parse_size("1MiB")
    _refused(_cli("quantize", sharded, "-o", tmp_path / "out", "--max-memory", "1MiB"),
             "needs about", "--max-memory")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("text", ["lots", "-3GiB", "8 parsecs", "0"])
def test_a_cap_that_is_not_a_size(text):
    with pytest.raises(MemoryCapError, match="e.g. 8GiB"):
        parse_size(text)


def test_sizes_read_as_people_write_them():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5g") == int(1.5e9) and parse_size(1234) == 1234
