"""Peers: other quantization libraries, run on the same model, data and metric as lowbit.

Each peer is a real install (an optional extra); a peer that is not installed is reported as
such, never imitated. Every peer config names the lowbit recipe it is nearest to:

- ``torchao:int8-weight``: ``Int8WeightOnlyConfig()``, per-row int8 (nearest: ``w8``)
- ``torchao:int8-dynamic``: ``Int8DynamicActivationInt8WeightConfig()`` (``w8a8``)
- ``torchao:int4-weight-g32``: ``IntxWeightOnlyConfig(int4, PerGroup(32), asymmetric)``, the
  int4 weight-only config torchao runs on a CPU; it holds one code per int8 (``w4g32``)
- ``quanto:qint8`` / ``quanto:qint4``: ``quantize(weights=...)`` + ``freeze``; qint4 uses
  groups of 128, which quanto may silently change (``w8`` / ``w4g128``)
- ``llama.cpp:Q8_0`` / ``Q4_0`` / ``Q4_K_M``: ``llama_model_quantize`` of the model's GGUF,
  run by llama-cpp-python (``w8`` / ``w4g32`` / ``w4g128``)

llama.cpp needs the model as a GGUF file; SmolLM2's bundled GGUF holds Q4_1 weights whose
dequantization is lowbit's FP32 baseline, so re-quantizing it (``allow_requantize``) quantizes
exactly the baseline's values.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.size import SizeReport

__all__ = ["PEERS", "BenchError", "Peer", "PeerConfig", "find_config", "peer_configs", "peer_size",
           "peer_status", "tensor_nbytes"]


class BenchError(LowbitError, ValueError):
    """The benchmark cannot run as asked; the message names the fix. Defined here, below
    ``bench`` (which re-exports it), because picking peer configs already raises it."""


@dataclass(frozen=True)
class PeerConfig:
    id: str  # "torchao:int8-weight"
    peer: str  # key of PEERS
    label: str  # what runs, in words
    nearest: str  # the lowbit recipe it compares with
    apply: Callable  # (model, spec, workdir) -> model to evaluate (may be a new module)


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # import name that tells whether it is installed
    dist: str  # distribution name (for the version)
    install: str  # how to install it
    configs: tuple[PeerConfig, ...]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao, quanto) whose outer
    dtype is not the storage dtype."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def peer_size(model: nn.Module) -> SizeReport:
    """``model_size`` for models whose weights are tensor subclasses (bytes counted inside)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_nbytes(t)
    linear_bytes = weights = quantized = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            linear_bytes += tensor_nbytes(w)
            weights += m.in_features * m.out_features
            quantized += type(w) not in (torch.Tensor, nn.Parameter)
    return SizeReport(total, linear_bytes, weights, quantized)


class NoInferenceMode(nn.Module):
    """Runs a peer model under ``no_grad`` instead of ``inference_mode`` (quanto's qint4
    weights fail under inference mode); forward and generate pass through."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = getattr(inner, "config", None)

    def forward(self, ids: torch.Tensor, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.inner(ids.clone(), **kwargs)

    def generate(self, ids: torch.Tensor, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.inner.generate(ids.clone(), **kwargs)


# -- torchao -------------------------------------------------------------------------------
def _torchao(make_config: Callable, dtype: torch.dtype = torch.float32):
    def apply(model: nn.Module, spec: str, workdir) -> nn.Module:
        from torchao.quantization import quantize_

        model.to(dtype)
        quantize_(model, make_config())
        return model
    return apply


def _int8_weight():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4_g32():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                mapping_type=MappingType.ASYMMETRIC)


# -- optimum-quanto ------------------------------------------------------------------------
def _quanto(qtype: str):
    def apply(model: nn.Module, spec: str, workdir) -> nn.Module:
        import optimum.quanto as oq

        oq.quantize(model, weights=getattr(oq, qtype))
        oq.freeze(model)
        return NoInferenceMode(model)
    return apply


# -- llama.cpp -----------------------------------------------------------------------------
def _llama_cpp(ftype: str):
    def apply(model: nn.Module, spec: str, workdir) -> nn.Module:
        from lowbit.eval.llama_cpp_peer import LlamaCppLM, quantize_gguf, source_gguf

        source = source_gguf(spec)
        target = quantize_gguf(source, ftype, workdir)
        return LlamaCppLM(target, n_vocab=_vocab(model))
    return apply


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


PEERS: dict[str, Peer] = {
    "torchao": Peer("torchao", "torchao", "torchao", "pip install torchao", (
        PeerConfig("torchao:int8-weight", "torchao", "torchao int8 weight-only (per row)", "w8",
                   _torchao(_int8_weight)),
        PeerConfig("torchao:int8-dynamic", "torchao", "torchao int8 dynamic activations + int8 "
                   "weights", "w8a8", _torchao(_int8_dynamic)),
        PeerConfig("torchao:int4-weight-g32", "torchao", "torchao intx int4 weight-only, group "
                   "32, asymmetric (codes stored as int8)", "w4g32", _torchao(_int4_g32)),
    )),
    "quanto": Peer("quanto", "optimum.quanto", "optimum-quanto", "pip install optimum-quanto", (
        PeerConfig("quanto:qint8", "quanto", "optimum-quanto qint8 weights", "w8",
                   _quanto("qint8")),
        PeerConfig("quanto:qint4", "quanto", "optimum-quanto qint4 weights (group 128)",
                   "w4g128", _quanto("qint4")),
    )),
    "llama.cpp": Peer("llama.cpp", "llama_cpp", "llama-cpp-python",
                      "pip install llama-cpp-python (builds llama.cpp from source)", (
        PeerConfig("llama.cpp:Q8_0", "llama.cpp", "llama.cpp Q8_0 (block 32)", "w8",
                   _llama_cpp("Q8_0")),
        PeerConfig("llama.cpp:Q4_0", "llama.cpp", "llama.cpp Q4_0 (block 32, symmetric)",
                   "w4g32", _llama_cpp("Q4_0")),
        PeerConfig("llama.cpp:Q4_K_M", "llama.cpp", "llama.cpp Q4_K_M (k-quants, mixed)",
                   "w4g128", _llama_cpp("Q4_K_M")),
    )),
}
ALIASES = {"optimum-quanto": "quanto", "llamacpp": "llama.cpp", "llama-cpp-python": "llama.cpp",
           "ao": "torchao"}


def peer_status(name: str) -> dict:
    """``{"installed": bool, "version": str | None, "install": str}`` for peer ``name``."""
    peer = PEERS[ALIASES.get(name, name)]
    try:
        installed = importlib.util.find_spec(peer.module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        installed = False
    version = None
    if installed:
        try:
            version = importlib.metadata.version(peer.dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return {"installed": installed, "version": version, "install": peer.install}


def peer_configs(names) -> list[PeerConfig]:
    """Every config of the peers named (``torchao``, ``quanto``, ``llama.cpp``)."""
    out = []
    for name in names:
        key = ALIASES.get(name, name)
        if key not in PEERS:
            raise BenchError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
        out.extend(PEERS[key].configs)
    return out


def find_config(config_id: str) -> PeerConfig | None:
    """The peer config called ``config_id`` (``torchao:int8-weight``), or None."""
    for peer in PEERS.values():
        for c in peer.configs:
            if c.id.lower() == config_id.lower():
                return c
    return None
