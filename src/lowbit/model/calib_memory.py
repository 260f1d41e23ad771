"""How calibration holds its data: batches of token ids, block inputs in float16, and
freed heap pages handed back to the OS (``runner.py`` uses these)."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools

import torch
from torch import nn

from lowbit.model.recipe import RecipeError


def _batches(calibration, model: nn.Module, max_tokens: int) -> list:
    """The calibration items as a list (a ``lowbit.data.TextCalibration``, which still
    needs a tokenizer, is resolved with the model's), stacked by ``_rebatch``."""
    if callable(getattr(calibration, "batches", None)):
        calibration = calibration.batches(model)
    batches = list(calibration)
    if not batches:
        raise RecipeError("the calibration data is empty: pass at least one batch")
    return _rebatch(batches, max_tokens)


#: calibration forwards run on up to this many tokens at once (2 windows of 512): on
#: SmolLM2-135M, GPTQ's peak memory over 16 x 512 tokens was 1.37x the FP32 model at 1024
#: against 1.67-1.74x at 4096 (one block's activations, attention scores included), in the
#: same time (105 s vs 103-115 s; ``benchmarks/algorithms.py --memory``); over 128 x 512
#: tokens, 1.45-1.47x in 120-123 s at 1024 against 1.44x in 135 s at 512 (2 cores, AMX)
REBATCH_TOKENS = 1024


def _rebatch(batches: list, max_tokens: int = REBATCH_TOKENS) -> list:
    """Stack token-id tensors of one shape ``[b, T]`` into ``[k*b, T]`` batches of at most
    ``max_tokens`` tokens: the same tokens and statistics, fewer and larger matmuls (one
    forward of 8x512 tokens costs far less than 8 of 512). Anything else stays as given."""
    first = batches[0]
    if not (isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point()
            and all(isinstance(b, torch.Tensor) and b.shape == first.shape for b in batches)):
        return batches
    per = max(1, max_tokens // first.numel())
    return [torch.cat(batches[i:i + per]) for i in range(0, len(batches), per)]


#: block inputs are held in float16 between blocks: half the bytes of the largest buffer,
#: ``tokens x hidden`` (0.29x the FP32 model at 128 x 512 tokens on SmolLM2-135M), for a
#: relative rounding of 2^-11 on each input, far below what 2-8 bit weights add. The
#: reference GPTQ code holds them in float16 too (it runs the model in it). A token (row)
#: whose largest entry exceeds this limit is held divided by a power of two that brings it
#: under: exact, so the rounding stays 2^-11. LLMs have such rows (SmolLM2-135M's
#: "massive activations" from block 11 on); held in float32 they took GPTQ's peak memory
#: from 1.47x to 1.55x the FP32 model. A batch with a non-finite entry stays as it is.
HALF_LIMIT = 2.0**14


class ScaledHalf:
    """A float16 tensor and the per-row powers of two it was divided by (see ``HALF_LIMIT``)."""

    __slots__ = ("half", "scale")

    def __init__(self, half: torch.Tensor, scale: torch.Tensor):
        self.half, self.scale = half, scale

    @property
    def dtype(self) -> torch.dtype:
        return self.half.dtype


def _hold(h: torch.Tensor, half: bool) -> torch.Tensor | ScaledHalf:
    """``h`` as calibration stores it between uses: float16 when ``half``, else unchanged."""
    if not half or h.dtype != torch.float32 or h.dim() == 0:
        return h
    peak = h.abs().amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(peak).all()):
        return h
    if bool((peak <= HALF_LIMIT).all()):
        return h.half()
    scale = torch.exp2(torch.ceil(torch.log2(peak / HALF_LIMIT)).clamp_min(0))
    return ScaledHalf((h / scale).half(), scale)


def _restore(h: torch.Tensor | ScaledHalf, dtype: torch.dtype) -> torch.Tensor:
    """What ``_hold`` stored, in ``dtype`` (a fresh tensor, or ``h`` when it is ``dtype``)."""
    if isinstance(h, ScaledHalf):
        return h.half.to(dtype) * h.scale.to(dtype)
    return h.to(dtype)


@functools.cache
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


def _malloc_trim():
    return _libc_function("malloc_trim")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
#: during a group's solve, buffers from this size up get their own mapping, returned to the
#: OS when freed (no heap fragmentation); outside it glibc's ceiling for the dynamic
#: threshold, so the forwards' activations reuse heap pages (1 MB everywhere: 1.41x peak
#: but 310 s instead of 170 s, the forwards page-faulting on every fresh buffer)
SOLVE_MMAP_BYTES, FORWARD_MMAP_BYTES = 1 << 20, 32 << 20
#: the pass that replaces a block's stored inputs by its outputs hands freed pages back
#: every this many batches: the heap otherwise grew by ~40 MB over one pass (the new
#: inputs do not fit the holes the old ones and the forwards' temporaries leave), which
#: was GPTQ's peak on SmolLM2-135M (1.51x the FP32 model, 1.47x with it; a trim costs 0.2 ms)
TRIM_EVERY = 8


_TUNING = contextvars.ContextVar("lowbit_allocator_tuning", default=False)


@contextlib.contextmanager
def allocator_tuning():
    """Let calibration set glibc's mmap threshold inside this block (``solve_allocations``).

    glibc cannot undo ``mallopt(M_MMAP_THRESHOLD)``: the threshold stays fixed for the rest of
    the process instead of adapting. So only processes that are lowbit's own (the CLI, the
    benchmarks) turn this on; ``lowbit.quantize`` called from a user's program leaves its
    allocator as it was and only hands freed pages back (``malloc_trim``, a one-off action).
    """
    token = _TUNING.set(True)
    try:
        yield
    finally:
        _TUNING.reset(token)


@contextlib.contextmanager
def solve_allocations():
    """Inside ``allocator_tuning``: large allocations of the block get their own mappings
    (glibc ``mallopt``), returned to the OS when freed. Elsewhere: nothing."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or not _TUNING.get():
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, SOLVE_MMAP_BYTES)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, FORWARD_MMAP_BYTES)


def _give_back_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``). Tensors of a few MB
    (one batch of activations, a Hessian) come from the heap, not from their own mappings,
    once glibc's dynamic mmap threshold has risen; their freed pages stay resident and the
    next block's transients land on top. With the solve's ``cols x cols`` buffers freed as
    it goes, trimming before and after each group's solve took GPTQ's peak over 128 x 512
    tokens on SmolLM2-135M from 1.52x to 1.44x the FP32 model
    (``benchmarks/algorithms.py --memory w4g128-gptq``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
