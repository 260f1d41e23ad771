"""Tests for lowbit.eval.peers and the llama.cpp peer: sizes inside tensor subclasses, install
status, GGUF sizes; llama.cpp itself only when llama-cpp-python is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.eval.llama_cpp_peer import LlamaCppError, gguf_size, source_gguf
from lowbit.eval.peers import PEERS, find_config, peer_size, peer_status, tensor_nbytes


def test_tensor_nbytes_plain_and_parameter() -> None:
    assert tensor_nbytes(torch.zeros(3, 4)) == 48
    assert tensor_nbytes(nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))) == 8


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_sizes_look_inside_torchao_tensors() -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    quantize_(model, Int8WeightOnlyConfig())
    size = peer_size(model)
    assert size.linear_weights == 64 * 32 and size.quantized_layers == 1
    assert 64 * 32 <= size.linear_bytes <= 64 * 32 + 32 * 8  # int8 codes + per-row params


def test_status_and_lookup() -> None:
    missing = PEERS["torchao"].__class__("x", "lowbit_no_such_module", "x", "pip install x", ())
    PEERS["_missing"] = missing
    try:
        assert peer_status("_missing") == {"installed": False, "version": None,
                                           "install": "pip install x"}
    finally:
        del PEERS["_missing"]
    assert find_config("TORCHAO:INT8-WEIGHT").nearest == "w8"
    assert find_config("torchao:int3") is None
    assert {c.nearest for p in PEERS.values() for c in p.configs} <= {
        "w8", "w8a8", "w4g32", "w4g128"}


def test_llama_cpp_needs_a_gguf(tiny_llama_dir: Path) -> None:
    with pytest.raises(LlamaCppError, match="needs the model as a GGUF file"):
        source_gguf(str(tiny_llama_dir))


def test_gguf_size(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = gguf_size(path)
    assert (size.linear_weights, size.linear_bytes, size.quantized_layers) == (32, 128, 0)
    assert size.model_bytes == path.stat().st_size and size.bits_per_weight == 32


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed")
def test_llama_cpp_q8_agrees_with_torch(tmp_path: Path) -> None:
    from lowbit.data import tokens
    from lowbit.eval.llama_cpp_peer import LlamaCppLM, quantize_gguf
    from lowbit.model import load_model, load_tokenizer

    ids = tokens("pydoc", load_tokenizer("smollm2-135m"), count=64)
    target = quantize_gguf(source_gguf("smollm2-135m"), "Q8_0", tmp_path)
    lm = LlamaCppLM(target, n_ctx=64, n_vocab=49152)
    try:
        logits = lm(ids[None])
    finally:
        lm.close()
    with torch.inference_mode():
        ref = load_model("smollm2-135m")(ids[None]).logits
    assert logits.shape == ref.shape
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert lm.lowbit_size.bits_per_weight == pytest.approx(8.5, abs=0.1)


def test_unknown_peer_raises_the_bench_error() -> None:
    from lowbit.eval import bench, peers

    assert bench.BenchError is peers.BenchError
    with pytest.raises(bench.BenchError, match="unknown peer"):
        peers.peer_configs(["nope"])
