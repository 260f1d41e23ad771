"""Output folders ``save`` must refuse, and damage a header check cannot see: a corrupt shard
index, a garbage tokenizer, renamed or missing tensors, NaN values stored in a checkpoint, GGUF
metadata that disagrees with its tensors."""

from __future__ import annotations

import json

from . import files
from .cases_files import _load_ckpt, _load_model
from .corpus import Env, case

# -- output folders save must not write ----------------------------------------------------


def _save_to(target, overwrite=True):
    from lowbit import save

    from ..model.tiny import tiny_llama

    save(tiny_llama(), target, overwrite=overwrite)


@case("output", "overwrite a Hugging Face model folder", says="not a lowbit checkpoint")
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    try:
        _save_to(folder)
    finally:
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


@case("output", "overwrite a regular file", says="not a lowbit checkpoint")
def _(env: Env):
    (env.tmp / "notes.txt").write_text("keep me")
    try:
        _save_to(env.tmp / "notes.txt")
    finally:
        assert (env.tmp / "notes.txt").read_text() == "keep me"


@case("output", "output under a file", says="is a file")
def _(env: Env):
    (env.tmp / "f").write_text("")
    _save_to(env.tmp / "f" / "sub" / "out")


@case("output", "existing checkpoint without overwrite", says="overwrite")
def _(env: Env):
    _save_to(env.copy(env.ckpt_dir, "ckpt"), overwrite=False)


@case("checkpoint", "NaN in a stored tensor", says="NaN")
def _(env: Env):
    from safetensors.torch import load_file, save_file

    folder = env.copy(env.ckpt_dir, "ckpt")
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("norm.weight"))
    tensors[key][0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    _load_ckpt(folder)


@case("folders", "tokenizer.json garbage", says="tokenizer")
def _(env: Env):
    from lowbit import load_tokenizer

    folder = env.copy(env.hf_dir, "hf")
    (folder / "tokenizer.json").write_text("{ not json")
    load_tokenizer(folder)


@case("folders", "shard index not JSON", says="index.json is corrupt")
def _(env: Env):
    folder = env.copy(env.hf_dir, "hf")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text("{ broken")
    _load_model(folder)


@case("folders", "shard index names a missing shard", says=("not in the folder",))
def _(env: Env):
    from safetensors import safe_open

    folder = env.copy(env.hf_dir, "hf")
    shard = folder / "model-00001-of-00002.safetensors"
    (folder / "model.safetensors").rename(shard)
    with safe_open(shard, "pt") as f:
        names = list(f.keys())
    weight_map = {n: shard.name for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    _load_model(folder)


def _rewrite_hf(env: Env, edit):
    from safetensors.torch import load_file, save_file

    folder = env.copy(env.hf_dir, "hf")
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@case("folders", "tensor renamed (would be random)", says="lack")
def _(env: Env):
    def edit(t):
        t["model.layers.0.mlp.up_prox.weight"] = t.pop("model.layers.0.mlp.up_proj.weight")
    _load_model(_rewrite_hf(env, edit))


@case("folders", "tensor missing (would be random)", says="lack")
def _(env: Env):
    _load_model(_rewrite_hf(env, lambda t: t.pop("model.norm.weight")))


def _tiny_gguf(env: Env) -> bytes:
    from ..model.test_loaders import write_tiny_gguf

    return write_tiny_gguf(env.hf_dir, env.tmp / "tiny.gguf").read_bytes()


@case("gguf", "two tensors on the same bytes", says="overlaps")
def _(env: Env):
    data = files.gguf_alias_tensor(_tiny_gguf(env), "blk.0.attn_k.weight", "blk.0.attn_q.weight")
    (env.tmp / "bad.gguf").write_bytes(data)
    _load_model(env.tmp / "bad.gguf")


@case("gguf", "metadata width disagrees with tensors", says=("fit", "describes"))
def _(env: Env):
    data = files.gguf_set_u32(_tiny_gguf(env), "llama.embedding_length", 96)
    (env.tmp / "bad.gguf").write_bytes(data)
    _load_model(env.tmp / "bad.gguf")
