"""The decode runtime's activation dtype follows autotune's measured choice, never changing
a float32 model's numbers; the synthetic block autotune times runs on the real runtime."""

import copy

import pytest
import torch

from lowbit.eval.speed import runtime_dtype
from lowbit.kernels import assume_cpu, autotune, native
from lowbit.model import quantize
from lowbit.runtime import DecoderRuntime
from lowbit.runtime.probe import step_candidates, synthetic_decoder


@pytest.fixture(scope="module")
def base():
    return synthetic_decoder(layers=1, vocab=32)


def _quantized(base, recipe):
    model = copy.deepcopy(base)
    with autotune.forcing({"compute": "fp32"}):
        quantize(model, recipe, progress=False)
    return model


@pytest.mark.parametrize("choice", ["fp32", "bf16"])
def test_dtype_follows_the_choice_where_numbers_allow(base, choice):
    want = torch.bfloat16 if choice == "bf16" else torch.float32
    choices = {f"runtime.{f}": choice for f in ("float", "int8_weight", "int4_weight", "w8a8")}
    w8, w8a8 = _quantized(base, "w8"), _quantized(base, "w8a8")
    bf16_model = copy.deepcopy(base).to(torch.bfloat16)
    with autotune.forcing(choices):
        assert runtime_dtype(base) is torch.float32  # an FP32 model decodes in FP32
        assert runtime_dtype(bf16_model) is want
        assert runtime_dtype(w8) is want  # weight-only kernels read bf16 anyway
        assert runtime_dtype(w8a8) is torch.float32  # bf16 would change its int8 codes


def test_flag_policy_is_the_old_rule(base):
    w8 = _quantized(base, "w8")
    with assume_cpu(native_bf16=True), native.force(False):
        assert runtime_dtype(w8) is torch.bfloat16  # int8pack_mm reads bf16
    with assume_cpu(native_bf16=True), native.force(True):
        assert runtime_dtype(w8) is torch.float32 or not native.available()


def test_synthetic_block_runs_both_steps(base):
    steps = step_candidates(prompt=4)
    assert set(steps) == {"fp32", "bf16"}
    for f in steps.values():
        f(2)
    rt = DecoderRuntime(synthetic_decoder(), dtype=torch.float32)
    assert rt.decode_path.startswith(("native loop", "native fused ops")) or not (
        native.available())
    ids = torch.arange(5).unsqueeze(0)
    logits = rt.prefill(ids, max_len=8)
    assert logits.shape == (1, 64) and torch.isfinite(logits).all()
