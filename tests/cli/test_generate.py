"""``lowbit generate`` through the installed console script, on a checkpoint that ``lowbit
quantize`` wrote: the streamed text is transformers' greedy text on the same quantized model,
and the closing line names the rates, the loop and the kernels. Bad input fails clearly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli.main import main
from lowbit.runtime.text import GenerateError, encode_prompt

transformers = pytest.importorskip("transformers")

LOWBIT = Path(sys.executable).with_name("lowbit")
PROMPT = "def add(a, b):"
CLOSING = re.compile(r"^\[(\d+) prompt \+ (\d+) new tokens \| prefill [\d.]+ tok/s, decode "
                     r"[\d.]+ tok/s \| (.+) \| kernels: (.+)\]$")


def _lowbit(*argv: str) -> subprocess.CompletedProcess:
    if not LOWBIT.exists():
        pytest.skip(f"console script {LOWBIT} not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(LOWBIT), *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def w8(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "w8"
    _lowbit("quantize", str(tiny_llama_dir), "-r", "w8", "-o", str(out), "--quiet")
    return out


def _hf_greedy_text(model, tok, prompt: str, n: int, chat: bool = False) -> str:
    ids = encode_prompt(tok, prompt, chat)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True,
                      clean_up_tokenization_spaces=False)


def test_streams_greedy_text_equal_to_transformers_on_the_checkpoint(w8: Path) -> None:
    proc = _lowbit("generate", str(w8), PROMPT, "--max-new-tokens", "8",
                   "--activations", "float")
    closing = CLOSING.match(proc.stderr.strip().splitlines()[-1])
    assert closing, proc.stderr
    assert closing[2] == "8" and closing[3].startswith("lowbit.runtime")
    assert closing[4].endswith("x15") and "int8_weight" in closing[4]  # 2 x 7 linears + head

    model, tok = lowbit.load_model(w8), lowbit.load_tokenizer(w8)
    expected = _hf_greedy_text(model, tok, PROMPT, 8)
    assert proc.stdout == expected + "\n"
    pieces: list[str] = []
    text, stats = lowbit.generate(model, tok, PROMPT, max_new_tokens=8, stream=pieces.append,
                                  activations="float")
    assert text == expected == "".join(pieces) and stats.new_tokens == 8
    printed = dict(item.rsplit(" x", 1) for item in closing[4].split(", "))
    assert stats.kernels == {name: int(n) for name, n in printed.items()}


@pytest.mark.parametrize("activations", ["int8", "auto"])
def test_int8_activations_are_named_in_the_closing_line(activations: str, w8: Path) -> None:
    """int8 activations (per block of 32, as llama.cpp) where asked or, by default, where
    they measured faster: the closing line says which ran; the text is the float loop's
    up to that rounding (not asserted token for token)."""
    from lowbit.runtime.native_loop import has_vnni

    argv = ["generate", str(w8), PROMPT, "--max-new-tokens", "8"]
    proc = _lowbit(*argv, *(["--activations", activations] if activations != "auto" else []))
    closing = CLOSING.match(proc.stderr.strip().splitlines()[-1])
    assert closing and closing[2] == "8", proc.stderr
    engine = closing[3]
    assert engine.startswith("lowbit.runtime (float32, native decode loop")
    if activations == "int8":
        assert engine.endswith(", int8 activations)")
    else:
        assert engine.endswith(("loop)", ", int8 activations)"))
    if activations == "int8" or has_vnni():  # float vs int8: the same model, same prompt
        model, tok = lowbit.load_model(w8), lowbit.load_tokenizer(w8)
        _, stats = lowbit.generate(model, tok, PROMPT, max_new_tokens=8, activations="int8")
        assert stats.engine.endswith(", int8 activations)") and stats.new_tokens == 8
        with pytest.raises(GenerateError, match="activations must be 'auto', 'int8' or"):
            lowbit.generate(model, tok, PROMPT, max_new_tokens=8, activations="int4")


def test_sampling_is_reproducible_from_the_seed(w8: Path, capsys) -> None:
    def sample(seed: str) -> str:
        argv = ["generate", str(w8), PROMPT, "--max-new-tokens", "8", "--temperature", "1.5",
                "--top-p", "0.95", "--seed", seed]
        assert main(argv) == 0
        return capsys.readouterr().out

    first = sample("7")
    assert first == sample("7") and first != sample("8")


def test_other_decoders_fall_back_to_transformers_and_say_so(tiny_tokenizer_dir, tmp_path,
                                                             capsys) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert main(["generate", str(tmp_path), PROMPT, "--max-new-tokens", "4"]) == 0
    closing = capsys.readouterr().err.strip().splitlines()[-1]
    assert "transformers generate (fallback: lowbit.runtime cannot run it: model_type 'gpt2'" \
        in closing and "tok/s" in closing


@pytest.mark.parametrize("argv, message", [
    (["   "], "the prompt is empty"),
    ([PROMPT, "--max-new-tokens", "300"], r"limit of 256 positions.*--max-new-tokens\) to 2\d\d"),
    ([PROMPT, "--chat"], r"--chat\) needs a chat template"),
    ([PROMPT, "--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_input_is_refused_clearly(argv, message, w8: Path, capsys) -> None:
    assert main(["generate", str(w8), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["generate", str(tmp_path), PROMPT]) == 2
    assert "no config.json, so it is not a Hugging Face model" in capsys.readouterr().err


def test_an_encoder_is_refused(tiny_tokenizer_dir, tmp_path: Path, capsys) -> None:
    transformers.BertModel(transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(tmp_path)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert main(["generate", str(tmp_path), PROMPT]) == 2
    assert "not a causal language model" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_chat_streams_transformers_greedy_answer() -> None:
    question = "What is the capital of France?"
    proc = _lowbit("generate", "smollm2-135m", question, "--chat", "--max-new-tokens", "24",
                   "--activations", "float")
    closing = CLOSING.match(proc.stderr.strip().splitlines()[-1])
    assert closing and closing[3].startswith("lowbit.runtime (float32")
    assert "Paris" in proc.stdout
    model, tok = lowbit.load_model("smollm2-135m"), lowbit.load_tokenizer("smollm2-135m")
    assert proc.stdout == _hf_greedy_text(model, tok, question, 24, chat=True) + "\n"
