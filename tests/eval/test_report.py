"""Tests for lowbit.eval.report: Pareto front, tables, files, plots (from a results dict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.eval.report import markdown_table, pareto_front, plot_sensitivity_heatmap, write_report


def _row(id_, kind, bits, dppl, kld, decode=None, **extra) -> dict:
    row = {"id": id_, "kind": kind, "label": id_, "status": "ok", "bits_per_weight": bits,
           "linear_bytes": int(bits * 1e6), "ppl": 10 * (1 + dppl / 100),
           "delta_ppl_pct": dppl, "kld_mean": kld, "kld_p99": 10 * kld,
           "top1_agreement": 1 - kld, "kernels": {"k": 3}, "command": f"lowbit eval m {id_}"}
    if decode is not None:
        row.update(decode_tok_s=decode, prefill_s=0.5, engine="transformers.generate")
    row.update(extra)
    return row


@pytest.fixture()
def results() -> dict:
    return {
        "settings": {"model": "m", "data": "pydoc", "window": 512, "n_windows": 32,
                     "protocol": "full", "recipes": ["w8", "w4g128"], "peers": ["torchao"]},
        "command": "lowbit bench m --recipes w8,w4g128 --report r",
        "environment": {"torch": "2.13.0", "lowbit": "0.1.0", "threads": 2},
        "peers": {"torchao": {"installed": True, "version": "0.18.0", "install": "pip"},
                  "llama.cpp": {"installed": False, "version": None,
                                "install": "pip install llama-cpp-python"}},
        "rows": [
            _row("fp32", "baseline", 32.0, 0.0, 0.0, decode=20.0),
            _row("w8", "lowbit", 8.5, 0.2, 0.004, decode=30.0,
                 layer_sqnr_db={"a": 38.0, "b": None, "lm_head": 40.1}),
            _row("w4g128", "lowbit", 4.6, 9.0, 0.09, decode=40.0,
                 layer_sqnr_db={"a": 18.0, "b": 17.5, "lm_head": 19.0}),
            _row("torchao:int8-weight", "peer", 8.6, 0.3, 3e-6, decode=12.0, peer="torchao"),
            {"id": "torchao:int4-weight-g32", "kind": "peer", "peer": "torchao",
             "status": "failed", "error": "AssertionError: 576 not divisible", "command": "c"},
            {"id": "llama.cpp:Q8_0", "kind": "peer", "peer": "llama.cpp",
             "status": "not installed", "command": "c2"},
        ],
    }


def test_pareto_front() -> None:
    pts = [(32, 0.0), (8.5, 0.2), (8.6, 0.3), (4.6, 9.0), (5.0, 12.0), (4.0, 30.0)]
    assert pareto_front(pts) == [5, 3, 1, 0]
    assert pareto_front([]) == []


def test_markdown_table(results: dict) -> None:
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 4  # header, rule, four finished rows
    assert lines[2].startswith("| fp32 | 32.00 | 32.0 | 10.000 | — | — |")
    w8 = lines[3].split(" | ")
    assert w8[4:8] == ["+0.20%", "0.0040", "0.040", "99.6%"]
    assert w8[-2] == "1.50"  # decode 30 tok/s vs FP32's 20
    assert "3.0e-06" in lines[5]  # tiny KLD in scientific notation


def test_write_report_files(results: dict, tmp_path: Path) -> None:
    paths = write_report(results, tmp_path)
    for name in ("report.md", "report.html", "pareto_ppl.png", "pareto_kld.png",
                 "speed_size.png", "layer_error.png"):
        assert paths[name].exists(), name
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "llama.cpp: **not installed** (install with `pip install llama-cpp-python`)" in md
    assert "`torchao:int4-weight-g32` **failed**: AssertionError" in md
    assert "lowbit bench m --recipes w8,w4g128 --report r" in md
    assert "| w8 | w8 | `lowbit eval m w8` |" in md and "![" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("<tr title=") == 4 and "lowbit eval m w4g128" in html
    assert "not installed" in html
    assert not list(tmp_path.glob("*.part"))
    assert json.dumps(results)  # the results were not changed into something unserialisable
    assert "linear_mb" not in results["rows"][0]


def test_report_without_plots_or_speed(results: dict, tmp_path: Path) -> None:
    for r in results["rows"]:
        r.pop("decode_tok_s", None)
    paths = write_report(results, tmp_path, plots=False)
    assert set(paths) == {"report.md", "report.html"}
    assert "## Plots" not in (tmp_path / "report.md").read_text()


def test_heatmap_from_dict(tmp_path: Path) -> None:
    rows = [{"block": f"model.layers.{i}", "index": i, "kind": k, "kld_mean": 0.001 * (i + 1)}
            for i in range(3) for k in ("mlp.up_proj", "self_attn.q_proj")]
    rows.append({"block": "lm_head", "index": None, "kind": "lm_head", "kld_mean": 0.02})
    png = plot_sensitivity_heatmap({"recipe": "w4g128", "rows": rows}, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
