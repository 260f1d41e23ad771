"""Bad files and folders: broken safetensors, GGUF, pickles, empty or half-made model folders
and lowbit checkpoints."""

from __future__ import annotations

import json

import torch

from . import files
from .corpus import Env, case, register_all

MODEL_FIX = ("truncated", "corrupt", "header", "dtype", "offset", "shape")


def _load_model(spec):
    from lowbit import load_model

    return load_model(spec)


def _load_ckpt(path):
    from lowbit import load

    return load(path)


def _damage(folder, damage) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))


# -- safetensors in a Hugging Face folder and in a lowbit checkpoint ------------------------


def _hf_case(damage):
    def run(env: Env):
        folder = env.copy(env.hf_dir, "hf")
        _damage(folder, damage)
        _load_model(folder)
    return run


def _ckpt_case(damage):
    def run(env: Env):
        folder = env.copy(env.ckpt_dir, "ckpt")
        _damage(folder, damage)
        _load_ckpt(folder)
    return run


register_all(files.SAFETENSORS_DAMAGE, "safetensors-hf", _hf_case)
register_all(files.SAFETENSORS_DAMAGE, "safetensors-checkpoint", _ckpt_case)

# -- GGUF -----------------------------------------------------------------------------------


def _gguf_case(fields):
    def run(env: Env):
        path = env.tmp / "model.gguf"
        path.write_bytes(files.gguf_bytes(**fields))
        _load_model(path)
    return run


register_all(files.GGUF_CASES, "gguf", _gguf_case)


@case("gguf", "truncated in the metadata", says=("past the end",))
def _(env: Env):
    path = env.tmp / "model.gguf"
    path.write_bytes(files.gguf_bytes()[:60])
    _load_model(path)


@case("gguf", "truncated in the tensor data", says=("past the end",))
def _(env: Env):
    path = env.tmp / "model.gguf"
    path.write_bytes(files.gguf_bytes()[:-8])
    _load_model(path)


@case("gguf", "empty", says=("empty",))
def _(env: Env):
    (env.tmp / "model.gguf").write_bytes(b"")
    _load_model(env.tmp / "model.gguf")


# -- pickles: refused by name or by content, never unpickled -------------------------------

PICKLE_FILES = {
    "torch-save.bin": files.write_torch_pickle,
    "torch-save.pt": files.write_torch_pickle,
    "torch-save.pth": files.write_torch_pickle,
    "torch-save.ckpt": files.write_torch_pickle,
    "raw.pkl": files.write_raw_pickle,
}


def _pickle_file(name, write):
    def run(env: Env):
        _load_model(write(env.tmp / name, env.marker))
    return run


def _pickle_as_checkpoint(name, write):
    def run(env: Env):
        _load_ckpt(write(env.tmp / name, env.marker))
    return run


for _name, _write in PICKLE_FILES.items():
    case("pickle", f"load_model {_name}", says="never unpickles", no_marker=True)(
        _pickle_file(_name, _write))
    case("pickle", f"load {_name}", says="never unpickles", no_marker=True)(
        _pickle_as_checkpoint(_name, _write))


@case("pickle", "pickle renamed .safetensors", says=("never unpickles",), no_marker=True)
def _(env: Env):
    _load_model(files.write_raw_pickle(env.tmp / "model.safetensors", env.marker))


@case("pickle", "zip-pickle as model.safetensors in HF folder", says="pickle", no_marker=True)
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    files.write_torch_pickle(folder / "model.safetensors", env.marker)
    _load_model(folder)


@case("pickle", "raw pickle as model.safetensors in HF folder", says="pickle", no_marker=True)
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    files.write_raw_pickle(folder / "model.safetensors", env.marker)
    _load_model(folder)


@case("pickle", "zip-pickle as model.safetensors in checkpoint", says="pickle", no_marker=True)
def _(env: Env):
    folder = env.copy(env.ckpt_dir, "ckpt")
    files.write_torch_pickle(folder / "model.safetensors", env.marker)
    _load_ckpt(folder)


@case("pickle", "HF folder with only pytorch_model.bin", says="never unpickles", no_marker=True)
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    (folder / "model.safetensors").unlink()
    files.write_torch_pickle(folder / "pytorch_model.bin", env.marker)
    _load_model(folder)


@case("pickle", "pickle renamed .gguf", says="not a GGUF", no_marker=True)
def _(env: Env):
    _load_model(files.write_torch_pickle(env.tmp / "model.gguf", env.marker))


# -- empty and half-made folders ------------------------------------------------------------


@case("folders", "empty .safetensors file", says=("pass the folder",))
def _(env: Env):
    (env.tmp / "model.safetensors").write_bytes(b"")
    _load_model(env.tmp / "model.safetensors")


@case("folders", "empty file without suffix", says=("unsupported file",))
def _(env: Env):
    (env.tmp / "model").write_bytes(b"")
    _load_model(env.tmp / "model")


@case("folders", "missing path", says=("no such file",))
def _(env: Env):
    _load_model(env.tmp / "nowhere")


@case("folders", "empty folder", says=("config.json",))
def _(env: Env):
    (env.tmp / "empty").mkdir()
    _load_model(env.tmp / "empty")


@case("folders", "folder without weights", says=("safetensors",))
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    (folder / "model.safetensors").unlink()
    _load_model(folder)


@case("folders", "empty model.safetensors in HF folder", says=("empty", "truncated"))
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    (folder / "model.safetensors").write_bytes(b"")
    _load_model(folder)


CONFIGS = {
    "config.json not JSON": ('{"model_type": "llama", ', "config.json"),
    "config.json empty": ("", "config.json"),
    "config.json a list": ("[1, 2]", "config.json"),
    "config.json without model_type": ("{}", "model_type"),
    "config.json unknown model_type": ('{"model_type": "no-such-arch"}', "no-such-arch"),
}


def _config_case(text):
    def run(env: Env):
        folder = env.copy(env.hf_dir, "hf")
        (folder / "config.json").write_text(text)
        _load_model(folder)
    return run


register_all(CONFIGS, "folders", _config_case)


@case("folders", "weights of another shape", says=("shape", "size"))
def _(env: Env):
    from safetensors.torch import load_file, save_file

    folder = env.copy(env.hf_dir, "hf")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _load_model(folder)


# -- lowbit checkpoint folders --------------------------------------------------------------


def _manifest_case(edit):
    def run(env: Env):
        folder = env.copy(env.ckpt_dir, "ckpt")
        path = folder / "manifest.json"
        new = edit(path.read_text())
        path.write_text(new if isinstance(new, str) else json.dumps(new))
        _load_ckpt(folder)
    return run


def _set(**kw):
    def edit(text):
        m = json.loads(text)
        for k, v in kw.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        return m
    return edit


def _entry(**kw):
    def edit(text):
        m = json.loads(text)
        name = sorted(m["quantized"])[0]
        m["quantized"][name].update(kw)
        return m
    return edit


def _config(**kw):
    def edit(text):
        m = json.loads(text)
        m["hf_config"].update(kw)
        return m
    return edit


MANIFESTS = {
    "manifest not JSON": (lambda t: t[: len(t) // 2], ("corrupt",)),
    "manifest empty": (lambda t: "", ("corrupt",)),
    "manifest a list": (lambda t: "[]", ("manifest",)),
    "manifest newer version": (_set(format_version=99), ("upgrade lowbit",)),
    "manifest version a string": (_set(format_version="one"), ("version",)),
    "manifest other format": (_set(format="safetensors-zoo"), ("format",)),
    "manifest without quantized": (_set(quantized=None), ("quantized",)),
    "manifest quantized a list": (_set(quantized=[1]), ("quantized",)),
    "manifest bad weight spec": (_entry(weight={"format": "int99"}), ("int99",)),
    "manifest wrong in_features": (_entry(in_features=3), ("300x3",)),
    "manifest unknown model_type": (
        _set(hf_config={"model_type": "no-such-arch"}), ("no-such-arch",)),
    "hf_config head_dim disagrees": (_config(head_dim=12), ("in the architecture",)),
    "hf_config invalid field": (_config(initializer_range=4.02), ("hf_config",)),
}
register_all(MANIFESTS, "checkpoint", _manifest_case)


def _ckpt_tensors_case(edit):
    def run(env: Env):
        from safetensors.torch import load_file, save_file

        folder = env.copy(env.ckpt_dir, "ckpt")
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors")
        _load_ckpt(folder)
    return run


def _drop(suffix):
    def edit(t):
        del t[next(k for k in sorted(t) if k.endswith(suffix))]
    return edit


def _reshape(suffix):
    def edit(t):
        k = next(k for k in sorted(t) if k.endswith(suffix))
        t[k] = torch.zeros(3, 5, dtype=t[k].dtype)
    return edit


def _retype(suffix):
    def edit(t):
        k = next(k for k in sorted(t) if k.endswith(suffix))
        t[k] = t[k].to(torch.float64)
    return edit


TENSORS = {
    "missing quantized codes": (_drop("qdata"), ("missing", "incomplete")),
    "missing scales": (_drop("scale"), ("missing", "incomplete")),
    "missing norm weight": (_drop("norm.weight"), ("lacks", "missing")),
    "codes of another shape": (_reshape("qdata"), ("shape",)),
    "scales of another shape": (_reshape("scale"), ("shape",)),
    "norm weight of another shape": (_reshape("norm.weight"), ("shape",)),
    "codes of another dtype": (_retype("qdata"), ("dtype",)),
    "norm weight of another dtype": (_retype("norm.weight"), ("dtype",)),
}
register_all(TENSORS, "checkpoint", _ckpt_tensors_case)


@case("checkpoint", "folder without manifest", says=("not a lowbit checkpoint",))
def _(env: Env):
    folder = env.copy(env.ckpt_dir, "ckpt")
    (folder / "manifest.json").unlink()
    _load_ckpt(folder)


@case("checkpoint", "manifest without weights", says=("model.safetensors",))
def _(env: Env):
    folder = env.copy(env.ckpt_dir, "ckpt")
    (folder / "model.safetensors").unlink()
    _load_ckpt(folder)
