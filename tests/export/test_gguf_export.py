"""GGUF export: lowbit's codes carried into llama.cpp blocks, read back through transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export.gguf_check import compare_weights, read_tensors  # noqa: E402

from .conftest import dequantized_copy, logits, tiny_decoder  # noqa: E402

HALF = 2.0**-11  # float16's relative rounding error: all an export of lowbit's codes adds
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _export(model, tmp_path, tok, name="m.gguf", **kw):
    kw.setdefault("embedding_type", "f32")
    kw.setdefault("float_type", "f32")
    return lowbit.export(model, "gguf", tmp_path / name, tokenizer=tok, **kw)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_float_model_round_trips_exactly(kind, tmp_path, tiny_tok):
    model = tiny_decoder(kind)
    report = _export(model, tmp_path, tiny_tok)
    assert report.architecture == ("qwen2" if kind == "qwen2" else "llama")
    names = set(read_tensors(report.path))
    assert "output.weight" not in names  # tied head: llama.cpp reuses token_embd
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    back = lowbit.load_model(report.path)
    torch.testing.assert_close(logits(back, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe, kind, carried", [
    ("w8", "q8_0", 15), ("w4g32", "q4_1", 15), ("w4g64", "q4_1", 15), ("w4g128", "q4_1", 15),
    ("w4", "q4_0", 15), ("w5", "q5_0", 15), ("w5g32", "q5_1", 15),
])
def test_quantized_codes_are_carried(recipe, kind, carried, tmp_path, tiny_tok):
    """Every quantized weight dequantizes (by gguf.quants) to lowbit's own weight, up to the
    float16 rounding of d and m; the reloaded model's logits match lowbit's."""
    model = tiny_decoder("llama")
    lowbit.quantize(model, recipe)
    report = _export(model, tmp_path, tiny_tok)
    assert report.carried == carried
    diffs = compare_weights(model, report.path)
    assert diffs[kind].tensors >= 14
    assert diffs[kind].max_rel <= HALF * 1.01, diffs
    assert diffs["f32"].max_abs == 0
    back = lowbit.load_model(report.path)
    ref = logits(dequantized_copy(model), IDS)
    assert (logits(back, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()


def _row_codes(data: np.ndarray, kind: str) -> np.ndarray:
    """Codes of uint8 block rows: int8 for Q8_0, nibbles (value j low, j+16 high) for Q4_1."""
    rows = data.shape[0]
    if kind == "q8_0":
        return data.reshape(rows, -1, 34)[:, :, 2:].view(np.int8).reshape(rows, -1)
    qs = data.reshape(rows, -1, 20)[:, :, 4:]
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, -1)


@pytest.mark.parametrize("recipe, kind", [("w8", "q8_0"), ("w4g32", "q4_1")])
def test_codes_are_bit_identical(recipe, kind, tmp_path, tiny_tok):
    from gguf import GGUFReader

    model = tiny_decoder("llama")
    lowbit.quantize(model, recipe)
    path = _export(model, tmp_path, tiny_tok).path
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    layer = model.model.layers[1].mlp.down_proj  # no q/k permutation
    ours = layer.packed_weight().codes().numpy()
    data = stored["blk.1.ffn_down.weight"]
    assert np.array_equal(_row_codes(data, kind), ours)
    if kind == "q4_1":  # bf16 scales are float16 numbers here: d is lowbit's scale exactly
        d = data.reshape(data.shape[0], -1, 20)[:, :, :2].copy().view(np.float16)[..., 0]
        scale = layer.packed_weight().qparams.scale.float().numpy()
        assert np.array_equal(d.astype(np.float32), scale)


def test_partial_last_group_and_tied_head_as_embedding(tmp_path, tiny_tok):
    model = tiny_decoder("llama")  # down_proj rows of 160 = 64 + 64 + 32
    lowbit.quantize(model, "w4g64")
    report = lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok)
    # tied: token_embd is the int8 head (Q8_0), no output.weight, as llama-quantize writes it
    assert report.shared_head and report.types["q8_0"] == 1 and "f16" not in report.types
    assert "output.weight" not in read_tensors(report.path)
    diffs = compare_weights(model, report.path)
    assert diffs["q4_1"].max_rel <= HALF * 1.01
    assert diffs["q8_0"].max_rel <= HALF * 1.01
    # an explicit type keeps lowbit's float embedding and writes the head separately
    report = lowbit.export(model, "gguf", tmp_path / "f.gguf", tokenizer=tiny_tok,
                           embedding_type="f16")
    assert not report.shared_head and report.types["f16"] == 1
    assert compare_weights(model, report.path)["f16"].max_rel <= HALF * 1.01


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_other_architectures_carry_codes(kind, tmp_path, tiny_tok):
    model = tiny_decoder(kind, tied=False)
    lowbit.quantize(model, "w8")
    report = _export(model, tmp_path, tiny_tok)
    assert "output.weight" in read_tensors(report.path)
    back = lowbit.load_model(report.path)
    ref = logits(dequantized_copy(model), IDS)
    assert (logits(back, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("float_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_float_model_rounded_like_llama_cpp(float_type, tmp_path, tiny_tok):
    from gguf import GGUFReader
    from gguf.quants import quantize

    from lowbit.export.gguf_blocks import ggml_type

    model = tiny_decoder("llama")
    path = _export(model, tmp_path, tiny_tok, float_type=float_type).path
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.ffn_up.weight"], quantize(w, ggml_type(float_type)))


def test_float_model_rounded_to_iq4_nl(tmp_path, tiny_tok):
    """gguf-py has no IQ4_NL quantizer: a float weight is rounded by lowbit on IQ4_NL's grid
    (gguf:iq4_nl's round to nearest), and gguf.quants reads back exactly that weight."""
    from lowbit.algorithms.round_to_nearest import quantize_weight
    from lowbit.formats.scaling import dequantize
    from lowbit.model.gguf_grids import grid_spec

    model = tiny_decoder("llama")
    path = _export(model, tmp_path, tiny_tok, float_type="iq4_nl").path
    kind, stored = read_tensors(path)["blk.0.ffn_up.weight"]
    w = model.model.layers[0].mlp.up_proj.weight.detach().float()
    codes, qp = quantize_weight(w, grid_spec("iq4_nl"))
    assert kind == "iq4_nl"
    assert np.array_equal(stored, dequantize(codes, qp).float().numpy())


def test_checkpoint_and_cli(tmp_path, tiny_llama_dir, capsys):
    from lowbit.cli.main import main

    model = lowbit.load_model(tiny_llama_dir)
    lowbit.quantize(model, "w4g32")
    ckpt = lowbit.save(model, tmp_path / "ckpt", tokenizer=lowbit.load_tokenizer(tiny_llama_dir))
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--to", "gguf", "-o", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "Q4_1" in text and "carry lowbit's codes unchanged" in text
    assert main(["export", str(ckpt), "-o", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    ref = logits(dequantized_copy(lowbit.load(ckpt)), IDS)
    # default: the embedding is the tied int8 head (llama-quantize's layout): close, not exact
    tied = logits(lowbit.load_model(out), IDS)
    assert (tied - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert main(["export", str(ckpt), "-o", str(out), "--overwrite", "--type", "f32",
                 "--embedding-type", "f32"]) == 0
    back = lowbit.load_model(out)
    assert (logits(back, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()
