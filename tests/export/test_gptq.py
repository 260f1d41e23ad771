"""GPTQ export: our own file unpacked by the layout's definition (written here from
GPTQModel's dequantization convention, not from the exporter) gives back lowbit's codes."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.export import UnsupportedSchemeError
from lowbit.nn import QuantizedLinear

from .conftest import tiny_decoder


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, C]`` -> ``[R * 32/bits, C]``: value r of a column is in word r // (32/bits)
    at bit bits * (r % (32/bits))."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return torch.stack(parts, dim=1).reshape(words.shape[0] * per, words.shape[1])


def _export(model, tmp_path, tok, **kw):
    from safetensors.torch import load_file

    report = lowbit.export(model, "gptq", tmp_path / "gptq", tokenizer=tok, **kw)
    config = json.loads((report.path / "config.json").read_text())
    return report, config, load_file(report.path / "model.safetensors")


@pytest.mark.parametrize("recipe, bits, group, sym", [
    ("w4g32-izp", 4, 32, False), ("w4", 4, -1, True), ("w8", 8, -1, True),
    ("w8g32-izp", 8, 32, False), ("gguf:q4_0", 4, 32, True)])
def test_unpacked_file_gives_lowbit_codes_exactly(recipe, bits, group, sym, tmp_path, tiny_tok):
    model = lowbit.quantize(tiny_decoder(), recipe)
    report, config, tensors = _export(model, tmp_path, tiny_tok)
    q = config["quantization_config"]
    assert (q["quant_method"], q["checkpoint_format"], q["bits"], q["group_size"], q["sym"],
            q["desc_act"]) == ("gptq", "gptq_v2", bits, group, sym, False)
    assert json.loads((report.path / "quantize_config.json").read_text()) == q
    assert (report.path / "tokenizer.json").is_file()
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        if f"{name}.qweight" not in tensors:  # the int8 head of a 4-bit recipe: float
            assert name in report.float_layers
            assert torch.allclose(tensors[f"{name}.weight"].float(),
                                  layer.dequantize_weight(), rtol=2**-10, atol=0)
            continue
        packed = layer.packed_weight()
        shift = 1 << (bits - 1) if layer.spec.fmt.min_value < 0 else 0
        codes = packed.codes().to(torch.int64) + shift  # lowbit's codes, unsigned
        K, N = layer.in_features, layer.out_features
        assert torch.equal(_unpack(tensors[f"{name}.qweight"], bits).t(), codes)
        zeros = _unpack(tensors[f"{name}.qzeros"].t().contiguous(), bits).t()  # [G, N]
        want = (torch.full((N, 1), 1 << (bits - 1)) if sym else
                packed.qparams.zero_point.to(torch.int64).reshape(N, -1) + shift)
        assert torch.equal(zeros.t(), want.expand(N, zeros.shape[0]))
        scales = tensors[f"{name}.scales"]  # float16: lowbit's bf16 group scales exactly
        ours = packed.qparams.scale.float().reshape(N, -1)
        assert scales.dtype == torch.float16
        assert torch.equal(scales.t(), ours.to(torch.float16))
        g_idx = tensors[f"{name}.g_idx"]
        assert torch.equal(g_idx, torch.arange(K, dtype=torch.int32) // (K if group < 0 else group))
        # the GPTQ formula on the unpacked tensors: lowbit's weight (up to the float16 rounding
        # of per-channel float32 scales)
        w = scales.float()[g_idx.long()] * (_unpack(tensors[f"{name}.qweight"], bits)
                                            - zeros[g_idx.long()]).float()
        if group > 0:
            assert torch.equal(w.t(), layer.dequantize_weight())
        else:
            torch.testing.assert_close(w.t(), layer.dequantize_weight(), rtol=2**-11, atol=0)
        checked += 1
    assert checked >= 14


def test_float_zero_points_and_activations_refused(tmp_path, tiny_tok):
    model = lowbit.quantize(tiny_decoder(), "w4g32")
    with pytest.raises(UnsupportedSchemeError, match="float zero-points.*'w4g32-izp'"):
        lowbit.export(model, "gptq", tmp_path / "g", tokenizer=tiny_tok)
    model = lowbit.quantize(tiny_decoder(), "w8a8-plain")
    with pytest.raises(UnsupportedSchemeError, match="weight-only.*'w8a8-plain'"):
        lowbit.export(model, "gptq", tmp_path / "g", tokenizer=tiny_tok)
    assert not (tmp_path / "g").exists()


def test_a_real_reader_loads_it(tiny_llama_dir, tmp_path):
    """transformers reads GPTQ checkpoints through gptqmodel (and optimum); neither installs
    on this CPU-only torch here (gptqmodel needs a newer torch), so this runs where they do."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (it needs torch >= 2.14)")
    pytest.importorskip("optimum", reason="transformers' GPTQ loader needs optimum")
    from lowbit.eval.perplexity_windows import perplexity
    from lowbit.export.hf_score import score_folders

    tok = lowbit.load_tokenizer(tiny_llama_dir)
    model = lowbit.quantize(lowbit.load_model(tiny_llama_dir), "w4g32-izp")
    ids = lowbit.data.tokens("pydoc", tok, count=4 * 128)
    ours = perplexity(model, ids, window=128, n_windows=4).ppl
    folder = lowbit.export(model, "gptq", tmp_path / "gptq", tokenizer=tok).path
    result = score_folders([folder], ids.view(4, 128).tolist())[str(folder)]
    assert not isinstance(result, str), result
    assert abs(result["ppl"] / ours - 1) < 0.005
