"""save / load: exact round trip, no pickle, atomic writes, corrupt files."""

import json

import pytest
import torch
from torch import nn

from lowbit.model import CheckpointError, load, quantize, save, serialization

from .tiny import tiny_llama


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama()
    quantize(model, "w4g32", progress=False)
    return model


@pytest.mark.parametrize("recipe", ["w8", "w4g128", "w3g64", "nf4g64", "w8a8", "bf16"])
def test_round_trip_is_exact(recipe, tmp_path):
    model = tiny_llama()
    quantize(model, recipe, progress=False)
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 20))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == recipe
    assert not list(tmp_path.glob(".*tmp"))


def test_custom_module_needs_architecture(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize(model, "w8", progress=False)
    save(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="model="):
        load(tmp_path / "c")
    skeleton = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    loaded = load(tmp_path / "c", model=skeleton)
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), model(x))


def test_existing_directory_refused(quantized, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="overwrite"):
        save(quantized, tmp_path / "out")
    save(quantized, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "manifest.json").exists()


def test_crash_mid_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(CheckpointError, match="disk full.*nothing was written"):
        save(quantized, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint(quantized, tmp_path):
    save(quantized, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / serialization.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "ckpt")


def test_not_a_checkpoint_and_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load(tmp_path)
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(p)


def test_outliers_round_trip(tmp_path):
    model = tiny_llama()
    quantize(model, "w8a8-outliers", [torch.randint(0, 128, (1, 32))], progress=False)
    save(model, tmp_path / "o")
    loaded = load(tmp_path / "o")
    ids = torch.randint(0, 128, (1, 12))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_converted_cnn_round_trip(tmp_path):
    from lowbit.training import convert, prepare_qat

    torch.manual_seed(0)

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))

    model = cnn()
    convert(prepare_qat(model, "w8"))
    save(model, tmp_path / "cnn")
    loaded = load(tmp_path / "cnn", model=cnn())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
