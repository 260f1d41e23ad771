"""Bad input to the GGUF export: each a LowbitError naming the problem and the fix."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import ExportError, UnsupportedSchemeError  # noqa: E402

from .conftest import tiny_decoder  # noqa: E402


def test_unknown_architecture(tmp_path, tiny_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(ExportError, match="llama, mistral, qwen2.*gpt2"):
        lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok)
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_format(tmp_path, tiny_tok):
    with pytest.raises(ExportError, match="lowbit exports to gguf"):
        lowbit.export(tiny_decoder(), "tflite", tmp_path / "m.tflite", tokenizer=tiny_tok)


@pytest.mark.filterwarnings("ignore:.*no Hadamard rotation")
@pytest.mark.parametrize("recipe, nearest, what", [
    ("nf4g64", "w4g64", "nf4"), ("w3g64", "w4g64", "uint3"), ("w2g16", "w4g32", "uint2"),
    ("w4g16", "w4g32", "groups of 16"), ("fp8", "w8", "fp8"),
    ("w8a8-plain", "w8", "activation"), ("w8a8", "w8", "rotation"),
    ("w4a8", "w4g32", "rotation"), ("w8-rot", "w8", "rotation"),
])
def test_scheme_without_gguf_type_names_nearest_recipe(recipe, nearest, what, tmp_path,
                                                       tiny_tok):
    model = tiny_decoder()
    lowbit.quantize(model, recipe)
    with pytest.raises(UnsupportedSchemeError, match=f"{what}.*recipe '{nearest}'") as err:
        lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok)
    assert isinstance(err.value, LowbitError)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("recipe, float_type", [("w8", "f16"), (None, "q8_0")])
def test_row_length_not_a_multiple_of_32(recipe, float_type, tmp_path, tiny_tok):
    model = tiny_decoder(hidden=48)
    if recipe:
        lowbit.quantize(model, recipe)
    with pytest.raises(ExportError, match="48 values are not a multiple of 32.*--type f16"):
        lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok,
                      float_type=float_type)


def test_existing_output_refused_without_overwrite(tmp_path, tiny_tok):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError, match="already exists.*overwrite=True"):
        lowbit.export(tiny_decoder(), "gguf", out, tokenizer=tiny_tok)
    assert out.read_bytes() == b"precious"
    lowbit.export(tiny_decoder(), "gguf", out, tokenizer=tiny_tok, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_interrupted_write_leaves_no_file(tmp_path, tiny_tok, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensors_to_file

    def killed(self, *args, **kwargs):
        self.write_ti_data_to_file()
        for fout in self.fout:
            fout.write(b"\0" * 1000)  # part of the data is out
        raise KeyboardInterrupt

    out = tmp_path / "m.gguf"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        lowbit.export(tiny_decoder(), "gguf", out, tokenizer=tiny_tok)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    lowbit.export(tiny_decoder(), "gguf", out, tokenizer=tiny_tok)
    before = out.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        lowbit.export(tiny_decoder(seed=1), "gguf", out, tokenizer=tiny_tok, overwrite=True)
    assert out.read_bytes() == before  # an interrupted overwrite keeps the old file
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_export_refused_by_load_model(damage, tmp_path, tiny_tok):
    out = tmp_path / "m.gguf"
    lowbit.export(tiny_decoder(), "gguf", out, tokenizer=tiny_tok)
    data = out.read_bytes()
    if damage == "truncate":
        out.write_bytes(data[: len(data) // 2])
    else:
        out.write_bytes(data[:4] + b"\xff" * 24 + data[28:])
    with pytest.raises(LowbitError):
        lowbit.load_model(out)


def test_unrecognised_pre_tokenizer_asks_for_its_name():
    from lowbit.export.gguf_vocab import TokenizerExportError, pre_tokenizer_name

    odd = {"pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(TokenizerExportError, match="tokenizer_pre=NAME"):
        pre_tokenizer_name(odd)
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"


def test_unknown_type(tmp_path, tiny_tok):
    with pytest.raises(ExportError, match="unknown GGUF type 'iq4_xs'"):
        lowbit.export(tiny_decoder(), "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok,
                      float_type="iq4_xs")


def test_temporary_file_of_a_killed_export_is_removed(tmp_path, tiny_tok):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".m.gguf.{dead}.tmp"
    stale.write_bytes(b"GGUF half-written")
    lowbit.export(tiny_decoder(), "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
