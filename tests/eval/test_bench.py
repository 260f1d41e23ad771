"""Tests for lowbit.eval.bench: a tiny matrix end to end, resume, interruption, peers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lowbit.eval import bench
from lowbit.eval.bench import BenchError, BenchSettings, plan, run_bench, split_list

TINY = {"window": 32, "n_windows": 2, "speed": False, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run single-threaded: on a busy machine two OpenMP threads spin for ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    from lowbit.model import load_model, load_tokenizer

    return load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)


def _run(tiny, out: Path, recipes=("w8", "w4g32"), peers=(), **kwargs) -> dict:
    model, tok = tiny
    settings = BenchSettings(model="tiny", recipes=tuple(recipes), peers=tuple(peers), **TINY)
    return run_bench(settings, out, model=model, tokenizer=tok, progress=False, **kwargs)


def test_two_recipes_write_results_and_report(tiny, tmp_path: Path) -> None:
    res = _run(tiny, tmp_path)
    assert [r["id"] for r in res["rows"]] == ["fp32", "w8", "w4g32"]
    assert all(r["status"] == "ok" for r in res["rows"])
    base, w8, w4 = res["rows"]
    assert base["delta_ppl_pct"] == 0 and base["bits_per_weight"] == 32
    assert w8["baseline_ppl"] == pytest.approx(base["ppl"])
    assert 8 < w8["bits_per_weight"] < 9 and 4 < w4["bits_per_weight"] < 6.5
    assert w4["kld_mean"] > w8["kld_mean"]
    assert w8["command"].startswith("lowbit eval tiny --recipe w8 --baseline tiny")
    assert "--windows 2" in w8["command"] and "--no-speed" in w8["command"]
    assert set(w4["layer_sqnr_db"]) >= {"lm_head", "model.layers.0.mlp.down_proj"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    for name in ("report.md", "report.html", "pareto_ppl.png", "pareto_kld.png",
                 "layer_error.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("*.part"))


def test_resume_skips_finished_rows(tiny, tmp_path: Path, monkeypatch) -> None:
    _run(tiny, tmp_path, recipes=("w8",), write_report=False)
    ran = []
    original = bench._run_entry

    def spy(entry, *args, **kwargs):
        ran.append(entry.id)
        return original(entry, *args, **kwargs)

    monkeypatch.setattr(bench, "_run_entry", spy)
    res = _run(tiny, tmp_path, recipes=("w8", "w4g64"), resume=True, write_report=False)
    assert ran == ["w4g64"]
    assert [r["id"] for r in res["rows"]] == ["fp32", "w8", "w4g64"]
    with pytest.raises(BenchError, match="--resume"):
        _run(tiny, tmp_path, recipes=("w8",))
    model, tok = tiny
    other = BenchSettings(model="tiny", recipes=("w8",), window=32, n_windows=3, speed=False,
                          threads=1)
    with pytest.raises(BenchError, match="n_windows=2"):
        run_bench(other, tmp_path, resume=True, model=model, tokenizer=tok, progress=False)


def test_interrupted_run_keeps_finished_rows(tiny, tmp_path: Path, monkeypatch) -> None:
    original = bench._run_entry

    def interrupt_on_w4(entry, *args, **kwargs):
        if entry.id == "w4g32":
            raise KeyboardInterrupt
        return original(entry, *args, **kwargs)

    monkeypatch.setattr(bench, "_run_entry", interrupt_on_w4)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path, write_report=False)
    kept = json.loads((tmp_path / "results.json").read_text())
    assert [r["id"] for r in kept["rows"]] == ["fp32", "w8"]
    monkeypatch.setattr(bench, "_run_entry", original)
    res = _run(tiny, tmp_path, resume=True, write_report=False)
    assert [r["id"] for r in res["rows"]] == ["fp32", "w8", "w4g32"]


def test_missing_peer_is_reported_not_run(tiny, tmp_path: Path, monkeypatch) -> None:
    from lowbit.eval import peers

    gone = dataclasses.replace(peers.PEERS["quanto"], module="lowbit_no_such_module")
    monkeypatch.setitem(peers.PEERS, "quanto", gone)
    from lowbit.eval.report import write_report

    res = _run(tiny, tmp_path, recipes=("w8",), peers=("quanto",), write_report=False)
    write_report(res, tmp_path, plots=False)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["quanto:qint4"]["status"] == "not installed" and "ppl" not in rows["quanto:qint4"]
    assert res["peers"]["quanto"]["installed"] is False
    report = (tmp_path / "report.md").read_text()
    assert "quanto: **not installed**" in report and "| quanto:qint8 |" not in report.split(
        "## Peers")[0]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None
                    or importlib.util.find_spec("optimum") is None,
                    reason="torchao and optimum-quanto are optional peers")
def test_installed_peers_run_on_the_same_data(tiny, tmp_path: Path) -> None:
    res = _run(tiny, tmp_path, recipes=("w8", "torchao:int8-weight", "quanto:qint8"),
               write_report=False)
    rows = {r["id"]: r for r in res["rows"]}
    for peer in ("torchao:int8-weight", "quanto:qint8"):
        assert rows[peer]["status"] == "ok", rows[peer].get("error")
        assert 8 <= rows[peer]["bits_per_weight"] < 9.5
        assert rows[peer]["tokens_scored"] == rows["w8"]["tokens_scored"]
        assert rows[peer]["kld_mean"] < 1e-2 and rows[peer]["peer_version"]
        assert rows[peer]["command"].startswith(f"lowbit bench tiny --recipes {peer}")


def test_plan_and_bad_input() -> None:
    with pytest.raises(BenchError, match="no recipes to benchmark"):
        plan(BenchSettings(model="m", recipes=()))
    with pytest.raises(BenchError, match="unknown peer config"):
        plan(BenchSettings(model="m", recipes=("torchao:int3",)))
    with pytest.raises(BenchError, match="unknown peer"):
        plan(BenchSettings(model="m", recipes=("w8",), peers=("bitsandbytes",)))
    from lowbit.model import RecipeError

    with pytest.raises(RecipeError, match="unknown recipe"):
        plan(BenchSettings(model="m", recipes=("w9",)))
    ids = [e.id for e in plan(BenchSettings(model="m", recipes=("w8", "quanto:qint8"),
                                            peers=("quanto",)))]
    assert ids == ["fp32", "w8", "quanto:qint8", "quanto:qint4"]
    assert split_list(" w8, ,w4g128,") == ["w8", "w4g128"]


def test_encoder_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    settings = BenchSettings(model="bert", recipes=("w8",), **TINY)
    with pytest.raises(BenchError, match="encoder.*lowbit eval"):
        run_bench(settings, tmp_path, model=bert, tokenizer=object(), progress=False)


def test_cli_empty_recipes_and_tiny_run(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from lowbit.cli.main import main

    assert main(["bench", str(tiny_llama_dir), "--recipes", " ,", "--report",
                 str(tmp_path)]) == 2
    assert "no recipes to benchmark" in capsys.readouterr().err
    rc = main(["bench", str(tiny_llama_dir), "--recipes", "w8", "--window", "32", "--windows",
               "1", "--no-speed", "--threads", "1", "--report", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| w8 |" in out and (tmp_path / "r" / "report.html").exists()
