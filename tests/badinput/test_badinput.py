"""Runs the bad-input corpus: every case must end in a ``LowbitError`` (from the CLI: exit
code 2 and an ``error:`` line, no traceback) whose message names the problem; nothing is ever
unpickled. The summary (tried / handled / not handled per category) prints at the end."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError

from .corpus import TALLY, Env, all_cases

CASES = all_cases()


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                          if c.xfail else []) for c in CASES])
def test_case(case, tmp_path, tiny_llama_dir, ckpt_dir):
    env = Env(tmp_path, tiny_llama_dir, ckpt_dir)
    outcome = "no error raised"
    try:
        if case.cli:
            code, message = case.run(env)
            outcome = f"exit code {code}: {message[-300:]}"
            assert "Traceback" not in message and code == 2 and "error:" in message
        else:
            try:
                case.run(env)
            except LowbitError as exc:
                message = str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded, then failed below
                outcome = f"raw {type(exc).__name__}: {str(exc)[:120]}"
                raise
            else:
                pytest.fail("no error: the input was accepted")
        for folder in (tmp_path, tiny_llama_dir, ckpt_dir):  # test names are in the paths
            message = message.replace(str(folder), "<dir>")
        outcome = f"message does not name the problem: {message[:200]}"
        assert any(s.lower() in message.lower() for s in case.says), message
        if case.no_marker:
            outcome = "UNPICKLED"
            assert not env.marker.exists(), "the booby-trapped pickle was unpickled"
        outcome = "handled"
    finally:
        TALLY.add(case, outcome)


def test_corpus_is_large_enough():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def test_booby_traps_would_fire(tmp_path):
    """The marker check means something: unpickling either trap does create the marker."""
    import pickle

    import torch

    from .files import write_raw_pickle, write_torch_pickle

    marker = tmp_path / "UNPICKLED"
    pickle.loads(write_raw_pickle(tmp_path / "a.pkl", marker).read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(write_torch_pickle(tmp_path / "b.pt", marker), weights_only=False)
    assert marker.exists()
