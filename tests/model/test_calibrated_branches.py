"""Calibration by residual branch (pre-norm blocks): fewer forwards, the same result, and a
block whose forward is not its branches runs whole."""

import copy

import pytest
import torch

from lowbit.model.arch import resolve_arch
from lowbit.model.pipeline import quantize_model
from lowbit.model.recipe import RecipeError
from lowbit.nn import QuantizedLinear

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ragged():
    """4 batches whose lengths differ, so they stay apart (``_rebatch`` stacks equal
    shapes)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 64 - i), generator=g) for i in range(4)]


def _kl(model, base):
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = base(ids).logits.float().log_softmax(-1)
        out = model(ids).logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).mean().item()


def _run(base, calib, whole: bool, **kw):
    """Quantize a copy with w4g32-gptq; count the calls of block 0's attention and MLP
    over the 4 calibration batches."""
    model = copy.deepcopy(base)
    arch = resolve_arch(model)
    if whole:
        for block in arch.blocks:
            block.branches = []
    calls = {"attn": 0, "mlp": 0}
    layer = model.model.layers[0]
    hooks = [layer.self_attn.register_forward_pre_hook(
                 lambda *_: calls.__setitem__("attn", calls["attn"] + 1)),
             layer.mlp.register_forward_pre_hook(
                 lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))]
    try:
        quantize_model(model, "w4g32-gptq", calib, progress=False, arch=arch, **kw)
    finally:
        for h in hooks:
            h.remove()
    return model, calls


def test_llama_blocks_resolve_into_two_branches(base):
    arch = resolve_arch(base)
    for block in arch.blocks:
        assert [len(b.groups) for b in block.branches] == [2, 2]
        assert block.branches[0].kwargs and not block.branches[1].kwargs
        assert block.branches[0].groups[0].linears[0].endswith("self_attn.q_proj")


def test_branches_rerun_less_and_quantize_the_same(base, ragged):
    """Whole blocks enter the attention for every group's pass (4) and the outputs (1);
    branches for the attention groups (2) and the branch output (1), plus the check of
    block 0 on the first batch (whole block and composed branches: 2). The MLP's groups and
    output: 3 per batch either way (plus the check)."""
    split, split_calls = _run(base, ragged, whole=False)
    whole, whole_calls = _run(base, ragged, whole=True)
    assert whole_calls == {"attn": 5 * 4, "mlp": 3 * 4}
    assert split_calls == {"attn": 3 * 4 + 2, "mlp": 3 * 4 + 2}
    kl_split, kl_whole = _kl(split, base), _kl(whole, base)
    assert abs(kl_split - kl_whole) < 0.1 * kl_whole, (kl_split, kl_whole)


def test_in_float32_branches_compute_what_whole_blocks_compute(base, ragged):
    """With the stored inputs in float32 the two loops do the same arithmetic (the
    branches' sum is the block's own residual add), so every layer gets the same codes;
    in float16 (the default) the branches also round ``h + attention`` once."""
    split, _ = _run(base, ragged, whole=False, half_inputs=False)
    whole, _ = _run(base, ragged, whole=True, half_inputs=False)
    for (name, a), (_, b) in zip(split.named_modules(), whole.named_modules(), strict=True):
        if isinstance(a, QuantizedLinear):
            torch.testing.assert_close(a.dequantize_weight(), b.dequantize_weight(),
                                       rtol=0, atol=0, msg=name)


def test_a_block_that_is_not_its_branches_runs_whole(base, ragged):
    """A forward that does more than ``h + b(norm(h))`` (here: scales the block output) is
    caught on block 0's first batch; calibration then runs whole blocks and says so."""
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        layer.register_forward_hook(
            lambda m, a, out: (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5)
    quantize_model(model, "w4g32-gptq", ragged, progress=False)
    notes = model.lowbit_calibration["notes"]
    assert any("not its residual branches" in n for n in notes), notes


def test_a_group_whose_members_read_different_inputs_is_refused(base, calib):
    """The first batch checks what the table claims (one input per group) before later
    batches stop at a group's first member."""
    model = copy.deepcopy(base)
    arch = resolve_arch(model)
    mlp = arch.blocks[0].branches[1]
    gate_up, down = mlp.groups
    gate_up.linears.append(down.linears[0])  # down_proj reads act(gate) * up, not the norm
    mlp.groups.remove(down)
    arch.blocks[0].groups.remove(down)
    with pytest.raises(RecipeError, match="gate_proj and .*down_proj are one group.*GroupSpec"):
        quantize_model(model, "w4g32-gptq", calib, progress=False, arch=arch)
