"""The path a user takes after the demo, through the installed ``lowbit`` console script:
quantize -> eval the checkpoint (alone and against a baseline) -> sensitivity / bench on it,
for a weight-only, a W8A8 and a calibrated recipe, on a tiny Llama folder with a tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli.main import main

LOWBIT = Path(sys.executable).with_name("lowbit")
SMALL = ("--window", "64", "--windows", "2")


def _lowbit(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    if not LOWBIT.exists():
        pytest.skip(f"console script {LOWBIT} not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(LOWBIT), *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


_MADE: dict[str, Path] = {}


def _made(recipe: str, source: Path, tmp_path_factory) -> Path:
    """The checkpoint of ``recipe``, written once per session by ``lowbit quantize``."""
    if recipe not in _MADE:
        out = tmp_path_factory.mktemp("ckpt") / recipe
        _lowbit("quantize", str(source), "-r", recipe, "-o", str(out),
                "--calibration-tokens", "1024", "--quiet")
        _MADE[recipe] = out
    return _MADE[recipe]


@pytest.fixture(params=["w8", "w8a8", "w4g32-gptq"])
def checkpoint(request, tiny_llama_dir: Path, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _made(request.param, tiny_llama_dir, tmp_path_factory)


def test_eval_of_a_checkpoint_with_and_without_baseline(checkpoint, tiny_llama_dir: Path):
    recipe, out = checkpoint
    alone = json.loads(_lowbit("eval", str(out), "--json", "--no-speed", *SMALL).stdout)
    assert alone["quantized_layers"] > 0 and alone["ppl"] > 1
    against = json.loads(_lowbit("eval", str(out), "--baseline", str(tiny_llama_dir), "--json",
                                 "--no-speed", *SMALL).stdout)
    assert against["ppl"] == pytest.approx(alone["ppl"], rel=1e-4)  # two processes
    assert against["kld_mean"] >= 0 and 0 < against["top1_agreement"] <= 1
    assert against["bits_per_weight"] < 16
    if recipe == "w8":  # 8-bit weights barely move a model's predictions
        assert against["kld_mean"] < 0.01
    calibration = json.loads((out / "manifest.json").read_text())["calibration"]
    assert calibration == ({"text": "default", "tokens": 1024} if recipe == "w4g32-gptq"
                           else None)  # only the calibrated recipe read text


def test_checkpoint_evaluated_against_itself_is_near_zero(checkpoint, capsys):
    """Baseline log-probabilities are held in bf16 (``eval.compare``): that sets the floor."""
    _, out = checkpoint
    assert main(["eval", str(out), "--baseline", str(out), "--json", "--no-speed", *SMALL]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kld_mean"] < 1e-3 and r["top1_agreement"] > 0.99


def test_sensitivity_of_a_checkpoint_uses_its_source_and_recipe(tiny_llama_dir, tmp_path,
                                                                 tmp_path_factory, capsys):
    out = _made("w8", tiny_llama_dir, tmp_path_factory)
    assert main(["sensitivity", str(out), "--json", "--heatmap", str(tmp_path / "h.png"),
                 *SMALL, "--windows", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["recipe"] == "w8" and len(r["rows"]) > 0


def test_bench_of_a_checkpoint(tiny_llama_dir, tmp_path, tmp_path_factory, capsys):
    out = _made("w8a8", tiny_llama_dir, tmp_path_factory)
    assert main(["bench", str(out), "--report", str(tmp_path / "r"), "--json", "--no-speed",
                 *SMALL]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["status"] for r in rows if r["id"] == "w8a8"] == ["ok"]


def test_requantizing_a_checkpoint_is_refused_with_exit_2(checkpoint, tmp_path):
    _, out = checkpoint
    proc = _lowbit("quantize", str(out), "-r", "w4g32", "-o", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "already quantized" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_without_tokenizer_files_uses_its_source(checkpoint, tmp_path, capsys):
    _, out = checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("manifest.json", "model.safetensors"):
        shutil.copy(out / name, bare / name)
    assert main(["eval", str(bare), "--json", "--no-speed", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_quantize_with_a_calibration_mix_records_it(tiny_llama_dir, tmp_path):
    """``--calibration default+FILE@0.5``: half the windows from the user's text; the line
    and the manifest say which text calibrated the checkpoint."""
    mine = tmp_path / "mine.txt"
    mine.write_text("Subject: lunch\nFrom: ann@example.org\n\nSee you at noon. " * 200)
    out = tmp_path / "ckpt"
    spec = f"default+{mine}@0.5"
    proc = _lowbit("quantize", str(tiny_llama_dir), "-r", "w4g32-gptq", "-o", str(out),
                   "--calibration", spec, "--calibration-tokens", "1024", "--quiet")
    assert f"calibration   {spec} (1024 tokens)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"] == {"text": spec, "tokens": 1024}
