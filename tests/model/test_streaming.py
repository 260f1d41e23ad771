"""Streaming quantization (``lowbit.quantize_checkpoint``): the same bytes as the in-memory
path, a killed run resumed bit for bit, block-by-block evaluation equal to the in-memory one,
and the CLI's switch to streaming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowbit as lb
from lowbit.model.shards import TensorFiles


def _sharded_llama(folder: Path, tokenizer_dir: Path, *, layers=3, hidden=64, inter=160,
                   tie=False, shard="60KB") -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size=shard)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return _sharded_llama(tmp_path_factory.mktemp("sharded"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 300, (1, 64), generator=g) for _ in range(4)]  # 256 tokens


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = TensorFiles(folder)
    return {n: files.read(n) for n in files.names()}


def _same_bytes(a: dict, b: dict) -> list[str]:
    assert sorted(a) == sorted(b)
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(
        a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]


def _in_memory(src: Path, recipe, calib, out: Path) -> Path:
    model = lb.load_model(src)
    lb.quantize(model, recipe, calib, progress=False)
    return lb.save(model, out)


@pytest.mark.parametrize("recipe", ["w4g32", "w4g32-gptq", "w3g32-gptaq", "w4g32-awq",
                                    "w4g64-gptq-rot"])
def test_streamed_checkpoint_holds_the_in_memory_bytes(sharded, calib, tmp_path, recipe):
    mem = _in_memory(sharded, recipe, calib, tmp_path / "mem")
    done = lb.quantize_checkpoint(sharded, recipe, tmp_path / "str", calib, progress=False)
    assert done.units == 3 + 2 and done.resumed == 0
    assert (tmp_path / "str" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "str").glob("model-*.safetensors"))) == 5
    assert _same_bytes(_tensors(mem), _tensors(done.path)) == []
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (mem, done.path))
    assert a["quantized"] == b["quantized"] and a["dtypes"] == b["dtypes"]
    assert a["recipe"] == b["recipe"] and a["hf_config"] == b["hf_config"]
    ids = calib[0]
    assert torch.equal(lb.load(mem)(ids).logits, lb.load(done.path)(ids).logits)
    assert not list(tmp_path.glob(".str*"))  # no partial folder left


def test_tied_head_kept_in_float_is_stored_once(tmp_path, tiny_tokenizer_dir, calib):
    src = _sharded_llama(tmp_path / "tied", tiny_tokenizer_dir, tie=True)
    recipe = lb.Recipe.parse("w4g32-gptq").with_keep("lm_head")
    mem = _in_memory(src, recipe, calib, tmp_path / "mem")
    done = lb.quantize_checkpoint(src, recipe, tmp_path / "str", calib, progress=False)
    manifest = json.loads((done.path / "manifest.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert _same_bytes(_tensors(mem), _tensors(done.path)) == []
    assert torch.equal(lb.load(mem)(calib[0]).logits, lb.load(done.path)(calib[0]).logits)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    import lowbit as lb
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 300, (1, 64), generator=g) for _ in range(4)]
    def kill(i, count, name):
        if i == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    lb.quantize_checkpoint(sys.argv[1], "w4g32-gptaq", sys.argv[2], calib, progress=False,
                           on_unit=kill)
""")


def test_killed_run_resumes_to_the_same_bytes(sharded, calib, tmp_path):
    """A run killed (SIGKILL, no clean-up) after block 1 is written leaves only the partial
    folder; without resume it is refused, with resume the result is the uninterrupted run's
    bytes (GPTAQ: both the quantized and the float calibration paths are restored)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(sharded), str(out), "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / "state.json").is_file()
    state = json.loads((partial / "state.json").read_text())
    assert sorted(state["units"]) == ["0", "1"] and state["held"] == "held-00001.safetensors"
    with pytest.raises(lb.model.stream_state.ResumeError, match="--resume"):
        lb.quantize_checkpoint(sharded, "w4g32-gptaq", out, calib, progress=False)
    with pytest.raises(lb.model.stream_state.ResumeError, match="settings"):
        lb.quantize_checkpoint(sharded, "w4g32-gptq", out, calib, progress=False, resume=True)
    torch.set_num_threads(1)  # the settings include the thread count
    try:
        resumed = lb.quantize_checkpoint(sharded, "w4g32-gptaq", out, calib, progress=False,
                                         resume=True)
        whole = lb.quantize_checkpoint(sharded, "w4g32-gptaq", tmp_path / "whole", calib,
                                       progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert resumed.resumed == 2 and whole.resumed == 0
    assert _same_bytes(_tensors(resumed.path), _tensors(whole.path)) == []
    assert not partial.exists()


def test_block_by_block_eval_equals_the_in_memory_eval(sharded, calib, tmp_path):
    from lowbit.eval import evaluate
    from lowbit.eval.streamed import streamed_evaluate

    done = lb.quantize_checkpoint(sharded, "w4g32-gptq", tmp_path / "q", calib, progress=False)
    streamed = streamed_evaluate(done.path, baseline=str(sharded), data="pydoc", window=64,
                                 n_windows=6, progress=False)
    model, base = lb.load(done.path), lb.load_model(sharded)
    memory = evaluate(model, lb.load_tokenizer(sharded), baseline=base, data="pydoc",
                      window=64, n_windows=6, speed=False)
    for key in ("ppl", "baseline_ppl", "delta_ppl_pct", "kld_mean", "kld_p99",
                "top1_agreement", "linear_bytes", "bits_per_weight"):
        assert streamed[key] == pytest.approx(memory[key], rel=1e-5, abs=1e-7), key
    assert streamed["kld_mean"] > 1e-7  # the quantized model is not the baseline
    assert streamed["kernels"] == memory["kernels"]


def test_cli_streams_a_model_over_the_cap_and_evaluates_it(tmp_path, tiny_tokenizer_dir,
                                                           capsys):
    """RTN on 6 blocks: the in-memory estimate (1.5x all FP32 weights) is over a cap that
    one block (3x its weights) fits, so the CLI streams by itself and says so."""
    from lowbit.cli.main import main
    from lowbit.model.stream_memory import folder_need, resident_bytes

    src = _sharded_llama(tmp_path / "src", tiny_tokenizer_dir, layers=6, hidden=256,
                         inter=512, shard="2MB")
    need, weights = folder_need(src, 0)
    cap = resident_bytes() + weights  # between one block's 3x and the whole model's 1.5x
    assert cap < need
    out = tmp_path / "out"
    code = main(["quantize", str(src), "-r", "w4g64", "-o", str(out), "--max-memory",
                 str(cap), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "quantizing one block at a time (streaming)" in err
    assert (out / "model.safetensors.index.json").is_file()
    mem = _in_memory(src, "w4g64", None, tmp_path / "mem")
    assert _same_bytes(_tensors(mem), _tensors(out)) == []
    code = main(["eval", str(out), "--stream", "--no-speed", "--window", "64", "--windows",
                 "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["streamed"] and result["ppl"] > 1
