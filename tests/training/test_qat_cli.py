"""``lowbit qat`` on a tiny on-disk Llama: train, convert, save, resume, recipe mismatch."""

import argparse

import pytest

from lowbit.cli import qat_cmd
from lowbit.model import load
from lowbit.nn import QuantizedLinear
from lowbit.training import TrainingError


def _run(*argv):
    p = argparse.ArgumentParser()
    qat_cmd.add_arguments(p)
    return qat_cmd.run(p.parse_args([str(a) for a in argv]))


def test_qat_command_trains_converts_and_resumes(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    common = ["--data", text, "--seq-len", 32, "--quiet", "--threads", 1]
    out = tmp_path / "q"
    assert _run(tiny_llama_dir, "--recipe", "w4g32", "--steps", 2, "-o", out,
                "--checkpoint-every", 1, *common) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "saved" in printed
    model = load(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    ckpt = tmp_path / "q.ckpt"
    assert _run(tiny_llama_dir, "--recipe", "w4g32", "--steps", 3, "-o", tmp_path / "q2",
                "--resume", ckpt, *common) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="different run"):
        _run(tiny_llama_dir, "--recipe", "w3g64", "--steps", 4, "-o", tmp_path / "q3",
             "--resume", ckpt, *common)


def test_parameter_efficient_modes(tiny_llama_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("class A:\n    pass\n" * 200)
    for mode in ("scales", "lora"):
        assert _run(tiny_llama_dir, "--recipe", "w4g32", "--steps", 1, "--train", mode,
                    "--loss", "ce", "--data", text, "--seq-len", 32, "--quiet",
                    "-o", tmp_path / mode) == 0
