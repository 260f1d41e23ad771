"""llama.cpp as a peer, through llama-cpp-python: quantize a GGUF file with
``llama_model_quantize`` and score it with lowbit's own perplexity loop.

``LlamaCppLM`` looks like a causal LM to ``eval.perplexity_windows``: ``forward(ids)`` returns
the logits llama.cpp computed for every position of each window (``logits_all=True``), so PPL,
KL divergence and top-1 come from the same code, data and protocol as lowbit's rows.
Speed is measured with llama.cpp's own loop (prefill of 512 tokens; 64 greedy tokens after a
32-token prompt), the way ``llama-bench -p 512 -n 64`` measures it.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.size import SizeReport
from lowbit.eval.speed import SpeedReport

FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
          "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "F16": "LLAMA_FTYPE_MOSTLY_F16"}


class LlamaCppError(LowbitError, RuntimeError):
    """llama.cpp could not quantize or run the model; the message names the fix."""


def source_gguf(spec: str) -> Path:
    """The GGUF file behind model ``spec`` (a bundled GGUF model or a .gguf path)."""
    from lowbit.model.hub import BUNDLED, bundled_path
    from lowbit.model.loaders import resolve_spec

    if spec in BUNDLED and BUNDLED[spec].kind == "gguf":
        return bundled_path(spec)  # the shipped GGUF, not the FP32 folder lowbit loads
    kind, path = resolve_spec(spec)
    if kind != "gguf":
        raise LlamaCppError(
            f"the llama.cpp peer needs the model as a GGUF file, and {spec!r} is a Hugging Face "
            "folder: convert it once with llama.cpp's convert_hf_to_gguf.py and pass the .gguf")
    return path


def quantize_gguf(source: Path, ftype: str, workdir: Path, threads: int = 2) -> Path:
    """Quantize ``source`` to ``ftype`` (``Q8_0``, ``Q4_K_M``...) into ``workdir``."""
    import llama_cpp

    if ftype not in FTYPES:
        raise LlamaCppError(f"unknown llama.cpp type {ftype!r}; use one of {', '.join(FTYPES)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"{source.stem}.{ftype}.gguf"
    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    params.allow_requantize = True  # the source may itself be quantized (SmolLM2: Q4_1)
    partial = target.with_suffix(".part")
    with _quiet():  # llama.cpp prints a line per tensor
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(),
                                            ctypes.byref(params))
    if rc != 0 or not partial.exists():
        raise LlamaCppError(f"llama_model_quantize({source.name} -> {ftype}) failed with code "
                            f"{rc}; run llama-quantize by hand to see llama.cpp's message")
    partial.rename(target)
    return target


def _quiet():
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        return suppress_stdout_stderr(disable=False)
    except ImportError:  # pragma: no cover - another llama-cpp-python layout
        import contextlib

        return contextlib.nullcontext()


def gguf_size(path: Path) -> SizeReport:
    """Bytes of the file; 'linear' = every 2-D tensor (the token embedding doubles as the
    output head in tied models, so it is counted like lowbit's ``lm_head``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    linear_bytes = weights = quantized = 0
    for t in reader.tensors:
        if len([d for d in t.shape if d > 1]) == 2:
            linear_bytes += int(t.n_bytes)
            weights += int(t.n_elements)
            quantized += t.tensor_type.name not in ("F32", "F16", "BF16")
    return SizeReport(path.stat().st_size, linear_bytes, weights, quantized)


class LlamaCppLM(nn.Module):
    """A GGUF model run by llama.cpp that answers ``forward(ids) -> logits``."""

    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 2,
                 n_vocab: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.threads = threads
        self.expected_vocab = n_vocab
        self._llm = None
        self._logits_all = True
        self.lowbit_size = gguf_size(self.path)
        self.lowbit_kernels = {f"llama.cpp {self.path.stem.rsplit('.', 1)[-1]}": 1}

    def _model(self, n_ctx: int, logits_all: bool = True):
        import llama_cpp

        if self._llm is None or self._llm.n_ctx() < n_ctx or self._logits_all != logits_all:
            self.close()
            self._llm = llama_cpp.Llama(str(self.path), n_ctx=max(n_ctx, self.n_ctx),
                                        n_batch=max(n_ctx, self.n_ctx), n_ubatch=512,
                                        n_threads=self.threads, n_threads_batch=self.threads,
                                        logits_all=logits_all, verbose=False)
            self._logits_all = logits_all
            if self.expected_vocab and self._llm.n_vocab() != self.expected_vocab:
                raise LlamaCppError(f"llama.cpp sees {self._llm.n_vocab()} tokens, the model "
                                    f"{self.expected_vocab}: the GGUF is another model")
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        ids = torch.as_tensor(ids).reshape(-1, ids.shape[-1])
        llm = self._model(ids.shape[-1])
        out = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(llm.scores[: len(row)].copy()))
        return torch.stack(out)

    def speed(self, token_ids: torch.Tensor, *, prefill_tokens: int = 512,
              prompt_tokens: int = 32, decode_tokens: int = 64, repeats: int = 3) -> SpeedReport:
        ids = torch.as_tensor(token_ids).reshape(-1).tolist()
        llm = self._model(max(prefill_tokens, prompt_tokens + decode_tokens), logits_all=False)

        def prefill():
            llm.reset()
            llm.eval(ids[:prefill_tokens])

        def decode():
            llm.reset()
            llm.eval(ids[:prompt_tokens])
            for _ in range(decode_tokens):
                llm.eval([llm.sample(top_k=1, temp=0.0)])

        pre = _median(prefill, repeats)
        dec = _median(decode, repeats)
        return SpeedReport(pre, decode_tokens / dec, "llama.cpp")


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
