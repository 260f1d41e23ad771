"""Ray gone wrong: an address where no cluster answers (a quick, clear error and no results
file), a worker process that dies in the middle of a cell (retried, or that cell reported
failed while the others keep their results), and --ray without Ray installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.cli.main import main
from lowbit.eval.bench import BenchError, BenchSettings, run_bench
from lowbit.model.distributed import DIE_HOOK, DistributedError

from .conftest import TINY, needs_ray, same_numbers

DEAD = "127.0.0.1:1"  # nothing listens on port 1


def _bench_args(model_dir: Path, report: Path, *extra: str) -> list[str]:
    return ["bench", str(model_dir), "--recipes", "w8,w4g32", "--window", "32", "--windows",
            "2", "--no-speed", "--threads", "1", "--report", str(report), "--json", *extra]


@needs_ray
def test_unreachable_address_fails_fast_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(_bench_args(tiny_llama_dir, tmp_path / "new", "--ray", DEAD)) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {DEAD}" in err and "ray start --head" in err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()
    assert main(["sensitivity", str(tiny_llama_dir), "--recipe", "w8", "--heatmap", "",
                 "--ray", DEAD]) == 2
    assert f"no Ray cluster answers at {DEAD}" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30  # Ray alone would retry for minutes
    with pytest.raises(DistributedError, match="not HOST:PORT"):
        run_bench(BenchSettings(model=str(tiny_llama_dir), recipes=("w8",), **TINY),
                  tmp_path / "other", ray="no-port-here")
    assert not (tmp_path / "other").exists()


@needs_ray
def test_unreachable_address_leaves_a_resumed_file_as_it_was(tiny_llama_dir, tmp_path):
    settings = BenchSettings(model=str(tiny_llama_dir), recipes=("w8",), **TINY)
    run_bench(settings, tmp_path, progress=False, write_report=False)
    before = (tmp_path / "results.json").read_bytes()
    more = BenchSettings(model=str(tiny_llama_dir), recipes=("w8", "w4g32"), **TINY)
    with pytest.raises(DistributedError, match="no Ray cluster answers"):
        run_bench(more, tmp_path, resume=True, ray=DEAD)
    assert (tmp_path / "results.json").read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def test_a_loaded_model_is_not_shipped_to_workers(tiny_llama_dir, tmp_path):
    from lowbit.model import load_model

    settings = BenchSettings(model="tiny", recipes=("w8",), **TINY)
    with pytest.raises(BenchError, match="load the model themselves by name or path"):
        run_bench(settings, tmp_path / "r", model=load_model(tiny_llama_dir), ray=True)
    assert not (tmp_path / "r").exists()


@needs_ray
def test_a_worker_that_dies_mid_cell(ray_cluster, tiny_llama_dir, tmp_path, monkeypatch):
    """The worker process running w4g32 exits (os._exit, a real death): with the death hook
    armed once the retry finishes the row; armed for good the row is recorded as failed, the
    others keep their numbers, and --resume runs only the failed row again."""
    settings = BenchSettings(model=str(tiny_llama_dir), recipes=("w8", "w4g32"), **TINY)
    serial = run_bench(settings, tmp_path / "serial", progress=False, write_report=False)
    marker = tmp_path / "died-once"
    monkeypatch.setenv(DIE_HOOK, f"w4g32@{marker}")
    retried = run_bench(settings, tmp_path / "retried", progress=False, write_report=False,
                        ray=True)
    assert marker.exists()  # it did die once
    assert [same_numbers(r) for r in retried["rows"]] == [same_numbers(r) for r in serial["rows"]]

    monkeypatch.setenv(DIE_HOOK, "w4g32")
    res = run_bench(settings, tmp_path / "failed", progress=False, write_report=False, ray=True)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["w4g32"]["status"] == "failed"
    assert "worker died" in rows["w4g32"]["error"] and "after 1 retry" in rows["w4g32"]["error"]
    assert [same_numbers(rows[i]) for i in ("fp32", "w8")] == [
        same_numbers(r) for r in serial["rows"][:2]]
    on_disk = json.loads((tmp_path / "failed" / "results.json").read_text())
    assert [r["status"] for r in on_disk["rows"]] == ["ok", "ok", "failed"]

    monkeypatch.delenv(DIE_HOOK)
    again = run_bench(settings, tmp_path / "failed", progress=False, write_report=False,
                      ray=True, resume=True)
    assert [same_numbers(r) for r in again["rows"]] == [same_numbers(r) for r in serial["rows"]]
    assert again["rows"][:2] == on_disk["rows"][:2]  # not rerun


@needs_ray
def test_a_dead_sensitivity_unit_is_named(ray_cluster, tiny_llama_dir, monkeypatch):
    from lowbit.eval.sensitivity import sensitivity
    from lowbit.model import load_model, load_tokenizer

    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    monkeypatch.setenv(DIE_HOOK, "model.layers.1")
    res = sensitivity(model, tok, "w4g32", per="block", window=32, n_windows=2,
                      progress=False, ray=True)
    assert [r.name for r in res.rows] == ["model.layers.0", "lm_head"]
    assert any(n.startswith("model.layers.1 was not measured: its worker died")
               for n in res.notes)


def test_ray_flag_without_ray_installed(tiny_llama_dir, tmp_path):
    """With Ray unimportable, --ray is a clear error naming the extra; without --ray the
    command runs serially as before."""
    code = ("import sys; sys.modules['ray'] = None\n"  # what an environment without Ray sees
            "from lowbit.cli.main import main\n"
            f"args = {_bench_args(tiny_llama_dir, tmp_path / 'r', '--ray')!r}\n"
            "assert main(args) == 2\n"
            f"assert main({_bench_args(tiny_llama_dir, tmp_path / 's')!r}) == 0\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'lowbit[distributed]'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]


@needs_ray
def test_quantize_ray_scores_auto_recipes_only(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_RAY", "")  # the CLI sets it for its run; restored after
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-r", "w8", "-o", str(out), "--ray"]) == 2
    assert "auto:<bpw>" in capsys.readouterr().err and not out.exists()
    t0 = time.perf_counter()
    assert main(["quantize", str(tiny_llama_dir), "-r", "auto:4", "-o", str(out),
                 "--calibration-tokens", "512", "--quiet", "--ray", DEAD]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {DEAD}" in err and "Traceback" not in err
    assert not out.exists() and time.perf_counter() - t0 < 60
