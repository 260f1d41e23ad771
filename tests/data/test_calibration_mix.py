"""Calibration mixes ``BASE+PART@F`` (``lowbit.data.calibration_mix``) and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.data import CorpusError, TextCalibration, calibration_mix, text


class _Chars:
    """One token per character: which file a window came from shows in its ids."""

    def encode(self, s, add_special_tokens=False):
        return [ord(c) for c in s]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, char in (("base", "a"), ("mail", "b"), ("code", "c")):
        out[name] = tmp_path / f"{name}.txt"
        out[name].write_text(char * 64 * 40)
    return out


def test_parse_plain_sources_and_mixes(files) -> None:
    assert calibration_mix.parse("default") is None
    assert calibration_mix.parse(str(files["base"])) is None
    assert calibration_mix.parse("default+my.txt@0.25") == ("default", [("my.txt", 0.25)])
    assert calibration_mix.parse("a+b@0.1+generated@0.2") == ("a", [("b", 0.1),
                                                                     ("generated", 0.2)])
    plus = files["base"].with_name("with+plus.txt")  # a file's own '+' is not a mix
    plus.write_text("x")
    assert calibration_mix.parse(str(plus)) is None


@pytest.mark.parametrize("spec, message", [
    ("default+my.txt", "needs a share"),
    ("default+my.txt@", "between 0 and 1"),
    ("default+my.txt@1.5", "between 0 and 1"),
    ("default+my.txt@abc", "between 0 and 1"),
    ("default+a@0.6+b@0.5", "add up to 1.1"),
    ("+my.txt@0.25", "no base text"),
])
def test_bad_mixes_name_the_fix(spec, message) -> None:
    with pytest.raises(CorpusError, match=message):
        calibration_mix.parse(spec)


def test_mix_shares_and_spreads_windows(files) -> None:
    spec = f"{files['base']}+{files['mail']}@0.25+{files['code']}@0.125"
    batches = text(spec, _Chars(), tokens=16 * 64, seq_len=64)
    assert len(batches) == 16 and all(b.shape == (1, 64) for b in batches)
    kinds = "".join(chr(int(b[0, 0])) for b in batches)
    assert all(len(set(b[0].tolist())) == 1 for b in batches)  # whole windows of one text
    assert kinds.count("b") == 4 and kinds.count("c") == 2 and kinds.count("a") == 10
    assert "bb" not in kinds and kinds.index("b") < 4  # spread, not appended at the end
    again = text(spec, _Chars(), tokens=16 * 64, seq_len=64, batch_size=4)
    assert torch.equal(torch.cat(again), torch.cat(batches))


def test_lazy_mix_resolves_later(files) -> None:
    spec = f"{files['base']}+{files['mail']}@0.5"
    lazy = text(spec, tokens=4 * 64, seq_len=64)
    assert isinstance(lazy, TextCalibration)
    assert len(lazy.batches(_Chars())) == 4


def test_too_short_part_is_an_error(files, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("z" * 100)  # one window of 64
    with pytest.raises(CorpusError, match="gave 1 windows"):
        text(f"{files['base']}+{short}@0.5", _Chars(), tokens=8 * 64, seq_len=64)


def test_a_share_below_one_window_is_an_error(files) -> None:
    with pytest.raises(CorpusError, match="gets no window of the 8"):
        text(f"{files['base']}+{files['mail']}@0.05", _Chars(), tokens=8 * 64, seq_len=64)


def test_generated_needs_the_model(files) -> None:
    with pytest.raises(CorpusError, match="needs the model"):
        text(f"{files['base']}+generated@0.25", _Chars(), tokens=8 * 64, seq_len=64)


def test_generated_part_comes_from_the_model(files, monkeypatch, tmp_path) -> None:
    from tests.model.tiny import tiny_llama

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(vocab=64)

    class Tok(_Chars):
        eos_token_id = 3

        def get_vocab(self):
            return {}

    got = text(f"{files['base']}+generated@0.5", Tok(), tokens=4 * 16, seq_len=16,
               model=model)
    firsts = [int(b[0, 0]) for b in got]
    assert firsts.count(ord("a")) == 2 and firsts.count(3) == 2  # generated start at eos
    assert all(int(b.max()) < 64 for b in got if int(b[0, 0]) == 3)
