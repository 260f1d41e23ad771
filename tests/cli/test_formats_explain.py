"""`lowbit formats` and `lowbit explain` through the real entry point."""

import json
import re

import pytest

from lowbit.cli.main import main


def test_formats_table_lists_every_family(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("int8", "uint4", "binary", "ternary", "gguf:q4_k_m", "gguf:q6_k"):
        assert name in out
    assert re.search(r"gguf:q4_0 +Q4_0 +int4 +32 +fp16 +4.5 ", out)  # 18 bytes per 32 values


def test_explain_worked_example_json(capsys):
    assert main(["explain", "int8", "--json", "--", "-0.5", "0.3", "1.2", "-2.1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["codes"] == [-30, 18, 73, -127]
    assert result["values"][0]["scale"] == pytest.approx(2.1 / 127, rel=1e-6)
    assert result["values"][3]["bits"] == "10000001"


def test_explain_asymmetric_text(capsys):
    assert main(["explain", "uint8", "--asymmetric", "--", "0", "1", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "asymmetric" in out and "SQNR" in out


def test_explain_unknown_format_is_a_clean_error(capsys):
    assert main(["explain", "int42", "--", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown format" in err and "int8" in err


def test_demo_table_is_printed_once_and_aligned(capsys):
    from lowbit.cli.demo_cmd import COLUMNS, _printer, _row

    r = {"ppl": 14.456, "bits_per_weight": 32.0, "bytes": 538e6, "kernels": {"F.linear": 3},
         "prefill_s": 10.072, "decode_tok_s": 11.8}
    q = {**r, "delta_ppl_pct": 0.25, "kld_mean": 0.0048, "top1_agreement": 0.96,
         "bits_per_weight": 8.07, "kernels": {"int8_weight.native": 211}}
    line = _printer(["fp32", "w8a8-smooth-rot"])
    line(_row("fp32", r, reference=True))
    line(_row("w8a8-smooth-rot", q))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and sum(ln.startswith("recipe") for ln in lines) == 1
    header_starts = [lines[0].index(c) for c in COLUMNS[1:]]
    for ln in (lines[2], lines[3]):
        assert all(ln[i - 1] == " " and ln[i] != " " for i in header_starts), ln
