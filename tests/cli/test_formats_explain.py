"""`lowbit formats` and `lowbit explain` through the real entry point."""

import json

import pytest

from lowbit.cli.main import main


def test_formats_table_lists_every_family(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("int8", "uint4", "binary", "ternary"):
        assert name in out


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
