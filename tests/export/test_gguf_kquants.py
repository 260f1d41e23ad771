"""llama.cpp's k-quants as lowbit grids: ``gguf:q6_k`` ... ``gguf:q2_k`` recipes solve on the
super-block scale grid (``formats.superblock``) and the export (``gguf_kquants``) carries
the codes and ``d * sc`` scales unchanged. Oracles: ``gguf.quants.dequantize`` (llama.cpp's
block arithmetic in numpy) and, where llama.cpp is built, its own ``quantize_row_*_K_ref``
and ``llama-perplexity``."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export import gguf_kquants as kq  # noqa: E402
from lowbit.export import llama_cpp_tools as tools  # noqa: E402
from lowbit.export.gguf_check import compare_weights  # noqa: E402
from lowbit.formats import QParams, dequantize, get_format, quantize  # noqa: E402
from lowbit.model.gguf_grids import GGUF_FALLBACK, grid_spec  # noqa: E402

from .conftest import dequantized_copy, logits, tiny_decoder  # noqa: E402

TYPES = list(kq.KQUANTS)
ASYMMETRIC = ("q5_k", "q4_k", "q2_k")
#: a min is rebuilt from lowbit's float32 zero-point: x = (q - z) s differs from the file's
#: d sc q - dmin m by float32 rounding only
MIN_BOUND = 2.0**-20
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = [torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(i))
         for i in range(12)]  # 768 tokens: more than the 544 inputs of down_proj


def _gguf_values(name: str, blocks: np.ndarray, shape) -> np.ndarray:
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(blocks, gguf.GGMLQuantizationType[name.upper()]).reshape(shape)


def _weights(rows=32, cols=1024, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.exponential(0.02, (rows, 1))).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    w[1, :16] = 0  # an all-zero group beside live ones
    w[2, 300] = 40 * np.abs(w[2]).max()  # an outlier: the other groups get small sc
    w[3] = np.abs(w[3])  # positive only (mins 0)
    return w


def _rtn(name: str, w: np.ndarray):
    W = torch.from_numpy(w)
    qp = grid_spec(name).qparams(W)
    codes = quantize(W, qp)
    return codes, qp, dequantize(codes, qp).numpy()


@pytest.mark.parametrize("name", TYPES)
def test_packed_blocks_decode_to_the_k_quant_formula(name):
    fmt, _, group, size = kq.KQUANTS[name]
    rng = np.random.default_rng(0)
    n, per = 6, 256 // group
    L = rng.integers(0, 1 << get_format(fmt).bits, (n, 256)).astype(np.uint8)
    d = rng.random(n).astype(np.float16).astype(np.float32)
    top = {"q6_k": 128, "q3_k": 32}.get(name, 64 if group == 32 else 16)
    sc = rng.integers(-top if name in kq.OFFSET else 0, top, (n, per))  # signed for Q6_K/Q3_K
    dmin = m = None
    if name in ASYMMETRIC:
        dmin = rng.random(n).astype(np.float16).astype(np.float32)
        m = rng.integers(0, top, (n, per))
    data = kq.pack(name, L, d, sc, dmin, m)
    assert data.shape == (n, size)
    expect = np.repeat(d[:, None] * sc, group, 1) * (L.astype(np.float32) - kq.OFFSET.get(name, 0))
    if dmin is not None:
        expect -= np.repeat(dmin[:, None] * m, group, 1)
    assert np.array_equal(_gguf_values(name, data, (n, 256)), expect.astype(np.float32))


@pytest.mark.parametrize("name", TYPES)
def test_rtn_export_dequantizes_to_lowbit_weights(name):
    """gguf.quants reads back exactly lowbit's weights (asymmetric: within float32 rounding
    of the float zero-point), every scale ``d * sc`` exact; all-zero and outlier blocks too."""
    w = _weights()
    codes, qp, ours = _rtn(name, w)
    file = _gguf_values(name, kq.carry(name, codes, qp.scale, qp.zero_point), w.shape)
    rel = np.abs(file - ours).max(1) / np.maximum(np.abs(ours).max(1), 1e-30)
    assert rel.max() <= (MIN_BOUND if name in ASYMMETRIC else 0.0)
    assert np.all(file[0, :256] == 0)


def _llama_ref():
    path = tools.tool_dir() / "libggml-base.so"
    if not path.is_file():
        pytest.skip(f"llama.cpp's libggml-base.so not in {tools.tool_dir()}; {tools.BUILD_HINT}")
    return ctypes.CDLL(str(path))


def _llama_quantize(lib, name: str, w: np.ndarray) -> np.ndarray:
    fn = getattr(lib, f"quantize_row_{name[:2]}_K_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = np.ascontiguousarray(w, np.float32)
    out = np.zeros((x.size // 256, kq.KQUANTS[name][3]), np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def _llama_params(name: str, b: np.ndarray):
    """(scale, offset) per group from llama.cpp's blocks (Q4_K/Q5_K/Q6_K headers)."""
    if name == "q6_k":
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        return d * b[:, 192:208].copy().view(np.int8), None
    d, dmin = (b[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
    return d * sc, dmin * m


#: lowbit's RTN takes each group's min/max (absmax) range; llama.cpp's reference searches it
#: (make_qkx2_quants, make_qx_quants, make_q3_quants): its RMSE is lower by this much at most
RTN_RMSE_RATIO = {"q6_k": 1.15, "q5_k": 1.1, "q4_k": 1.15, "q3_k": 1.4, "q2_k": 1.15}


@pytest.mark.parametrize("name", TYPES)
def test_rtn_against_llama_cpp_reference_quantizer(name):
    """gguf-py has no k-quant quantizer, so llama.cpp's own ``quantize_row_*_K_ref`` (from
    its built libggml-base) is the reference. Given llama.cpp's parameters lowbit picks the
    very codes it picks (every value equal); lowbit's own min/max choice of the parameters is
    not llama.cpp's search, so the bytes differ and its RMSE is a bounded factor above."""
    lib = _llama_ref()
    w = _weights(seed=3)
    theirs = _gguf_values(name, _llama_quantize(lib, name, w), w.shape)
    ours = _rtn(name, w)[2]
    rmse = [float(np.sqrt(((v - w) ** 2).mean())) for v in (ours, theirs)]
    assert rmse[1] <= rmse[0] <= RTN_RMSE_RATIO[name] * rmse[1]
    if name not in ("q6_k", "q5_k", "q4_k"):
        return
    group = kq.KQUANTS[name][2]
    scale, offset = _llama_params(name, _llama_quantize(lib, name, w))
    scale = torch.from_numpy(scale.reshape(w.shape[0], -1))
    sign = torch.where(scale < 0, -1.0, 1.0)  # Q6_K's effective scale may be negative
    W = torch.from_numpy(w) * sign.repeat_interleave(group, 1)
    zero = None if offset is None else torch.from_numpy(offset.reshape(scale.shape)) / \
        scale.abs().clamp_min(1e-30)
    spec = grid_spec(name)
    qp = QParams(spec.fmt, spec.granularity, scale.abs().clamp_min(1e-30), zero, "fp32")
    same = dequantize(quantize(W, qp), qp) * sign.repeat_interleave(group, 1)
    live = np.repeat(scale.numpy() != 0, group, 1)  # llama.cpp keeps other codes for sc = 0
    assert (np.abs(same.numpy() - theirs)[live] <= 1e-7 * np.abs(w).max()).all()


def _export(model, tmp_path, tok, name="m.gguf"):
    return lowbit.export(model, "gguf", tmp_path / name, tokenizer=tok, embedding_type="f32",
                         float_type="f32")


@pytest.mark.parametrize("name", TYPES)
def test_tiny_llama_every_k_type_reaches_the_file(name, tmp_path, tiny_tok):
    """RTN on the tiny Llama with rows of 256: q/k/v/o/gate/up in the k-quant; down_proj's
    544 inputs take llama.cpp's fallback type; gguf.quants reads lowbit's weights back."""
    model = tiny_decoder("llama", hidden=256)
    lowbit.quantize(model, f"gguf:{name}", progress=False)
    summary = model.lowbit_summary
    assert len(summary.fallback) == 2 and "down_proj" in summary.fallback[0]
    report = _export(model, tmp_path, tiny_tok)
    diffs = compare_weights(model, report.path)
    # the head is Q6_K, as llama-quantize's output; Q2_K is llama.cpp's mix: v, o in Q3_K
    assert diffs[name].tensors == (8 if name == "q2_k" else 12 + (name == "q6_k"))
    assert diffs["q6_k"].tensors >= 1
    assert diffs[name].max_rel <= (MIN_BOUND if name in ASYMMETRIC else 0.0)
    fallback = GGUF_FALLBACK[name]
    assert diffs[fallback].tensors >= 2
    assert diffs[fallback].max_rel <= 2.0**-11 * 1.01  # Q5_1's float16 m


@pytest.mark.parametrize("algorithm", ["gptaq", "awq", "awq+gptq", "hqq", "imatrix"])
def test_every_algorithm_solves_on_the_q4_k_grid(algorithm, tmp_path, tiny_tok):
    """Each algorithm's parameters are on the super-block grid (the export recovers d, sc,
    dmin, m from them or fails) and the file holds lowbit's weights (GPTQ: below). HQQ fits
    zero-points, so on the symmetric Q5_0 fallback layers it is RTN."""
    model = tiny_decoder("llama", hidden=256)
    lowbit.quantize(model, f"gguf:q4_k-{algorithm}", None if algorithm == "hqq" else CALIB,
                    progress=False)
    diffs = compare_weights(model, _export(model, tmp_path, tiny_tok).path)
    assert diffs["q4_k"].tensors == 12 and diffs["q4_k"].max_rel <= MIN_BOUND


@pytest.fixture(scope="module")
def q4_k_gptq(tmp_path_factory, tiny_tok):
    model = tiny_decoder("llama", hidden=256)
    lowbit.quantize(model, "gguf:q4_k-gptq", CALIB, progress=False)
    path = _export(model, tmp_path_factory.mktemp("q4k"), tiny_tok).path
    return model, path


def test_q4_k_gptq_tiny_llama_reloads_with_lowbit_logits(q4_k_gptq):
    model, path = q4_k_gptq
    diffs = compare_weights(model, path)
    assert diffs["q4_k"].tensors == 12 and diffs["q4_k"].max_rel <= MIN_BOUND
    assert diffs["q5_0"].tensors == 2 and diffs["q5_0"].max_rel == 0
    back = lowbit.load_model(path)
    ref = logits(dequantized_copy(model), IDS)
    assert (logits(back, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_saved_checkpoint_exports_the_same_blocks(q4_k_gptq, tmp_path, tiny_tok):
    """lowbit.save keeps the float32 scales and zero-points, so d, sc, dmin, m come back."""
    from gguf import GGUFReader

    model, path = q4_k_gptq
    lowbit.save(model, tmp_path / "ckpt", tokenizer=tiny_tok)
    again = _export(lowbit.load(tmp_path / "ckpt"), tmp_path, tiny_tok, "again.gguf").path
    first, second = ({t.name: np.asarray(t.data) for t in GGUFReader(p).tensors}
                     for p in (path, again))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.skipif(tools.find_tool("llama-perplexity") is None,
                    reason=f"llama.cpp tools not found in {tools.tool_dir()}; {tools.BUILD_HINT}")
def test_llama_perplexity_runs_the_q4_k_file(q4_k_gptq, tmp_path, tiny_tok):
    from lowbit.data.corpus import corpus_text
    from lowbit.eval import evaluate

    model, path = q4_k_gptq
    text = tmp_path / "text.txt"
    text.write_text(corpus_text("pydoc")[:40000])
    theirs = tools.perplexity(path, text, ctx=128, chunks=6)
    ours = evaluate(model, tiny_tok, data=str(text), window=128, n_windows=6,
                    protocol="llama.cpp", speed=False)["ppl"]
    # llama.cpp rounds activations to 8 bits in its k-quant dot products (Q8_K)
    assert math.isfinite(theirs) and abs(theirs / ours - 1) < 0.01, (theirs, ours)
