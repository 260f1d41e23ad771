"""Scoring one layer's candidate formats for ``auto:<bpw>`` (``mixed.py``): its stored bits,
its output error and the KL divergence of the next-token distribution when only that layer
is quantized. ``Scorer`` keeps the float model's pass over the sensitivity slice so each
score re-runs only the blocks from the layer's block on; the same code scores in this process
and in a Ray worker (``mixed_ray``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms import InputStats, quantize_weight
from lowbit.algorithms.group import Member, solve_group
from lowbit.formats import dequantize, rotate
from lowbit.model.arch import find_module, first_output, resolve_arch
from lowbit.model.recipe import Scheme
from lowbit.model.runner import _capture
from lowbit.model.targets import scheme_for_width
from lowbit.nn import PackedWeight

__all__ = ["Scorer", "group_stats", "layer_bits", "solve_candidate"]

def layer_bits(weight: torch.Tensor, scheme: Scheme) -> tuple[int, torch.Tensor]:
    """Stored bits (codes + scales + zero-points) of ``weight`` at ``scheme`` and its RTN."""
    codes, qp = quantize_weight(weight, scheme.weight, scheme.observer)
    packed = PackedWeight.from_codes(codes, qp)
    nbytes = sum(t.numel() * t.element_size() for t in packed.tensors().values())
    w_hat = dequantize(codes, qp)
    if scheme.weight.rotation is not None:  # codes of W R: the weight the layer applies
        w_hat = rotate(w_hat.double(), scheme.weight.rotation, inverse=True).float()
    return 8 * nbytes, w_hat


def _kl(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logq = torch.log_softmax(logits.float(), -1)
    return float((base_logp.exp() * (base_logp - logq)).sum(-1).mean())


class Scorer:
    """The float model's pass over the sensitivity slice, kept: each block's inputs, each
    layer's mean squared input, and the baseline's log-probabilities over the union of its
    top-``top_k`` tokens. A layer's candidate is then scored by re-running only the blocks from
    that layer's block on (the head alone for a layer outside the blocks)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: list, names: list[str], top_k: int = 32):
        self.model, self.arch = model, resolve_arch(model)
        self.norm = find_module(model, self.arch.final_norm)
        self.head = find_module(model, self.arch.head)
        hidden, self.kws = _capture(model, self.arch.blocks[0].module, batches)
        self.inputs, self.sq = [], {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(_sq_hook(self.sq, n))
                 for n in names]
        try:
            for block in self.arch.blocks:
                self.inputs.append(list(hidden))
                hidden = [first_output(block.module(h, **kw))
                          for h, kw in zip(hidden, self.kws, strict=True)]
            if self.head is not None and self.norm is not None:
                last = [self.head(self.norm(h)).float() for h in hidden]
                self.vocab = torch.unique(torch.cat([
                    x.reshape(-1, x.shape[-1]).topk(top_k, -1).indices.reshape(-1)
                    for x in last]))
                self.base = [torch.log_softmax(x[..., self.vocab], -1) for x in last]
            else:
                self.vocab, self.base = None, hidden
        finally:
            for h in hooks:
                h.remove()
        self.hidden = hidden
        self.where = {n: i for i, b in enumerate(self.arch.blocks) for g in b.groups
                      for n in g.linears}

    def _divergence(self, name: str) -> float:
        start = self.where.get(name)
        hs = self.hidden if start is None else self.inputs[start]
        for block in self.arch.blocks[start:] if start is not None else ():
            hs = [first_output(block.module(h, **kw)) for h, kw in zip(hs, self.kws,
                                                                      strict=True)]
        if self.vocab is None:
            return float(sum((h - b).pow(2).sum() / b.pow(2).sum()
                             for h, b in zip(hs, self.base, strict=True)) / len(hs))
        w = self.head.weight[self.vocab]
        return sum(_kl(b, torch.nn.functional.linear(self.norm(h), w)) for h, b in
                   zip(hs, self.base, strict=True)) / len(hs)

    @torch.no_grad()
    def score(self, name: str, candidates: dict[str, Scheme], kl_at,
              solved: dict | None = None) -> dict:
        """``{"kl", "bits", "err", "numel"}`` of layer ``name`` at ``candidates``; the KL is
        measured at the candidates in ``kl_at`` only. ``solved``: this layer's entry of
        ``solved_errors``, whose weights and errors replace round to nearest's."""
        lin = self.model.get_submodule(name)
        W = lin.weight.detach().clone()
        ms = self.sq[name] / max(1, self.sq[name + "#n"])
        entry = {"kl": {}, "bits": {}, "err": {}, "numel": W.numel()}
        for cand, scheme in candidates.items():
            # (unrotated where the width has no Hadamard matrix, as the recipe is applied)
            bits, w_hat = layer_bits(W.float(), scheme_for_width(scheme, W.shape[1]))
            entry["bits"][cand] = bits
            if solved is not None:  # the algorithm's weight and its Hessian-weighted error
                entry["err"][cand] = solved["err"][cand]
                w_hat = solved["w_hat"].get(cand)
            else:
                entry["err"][cand] = float(((W.float() - w_hat).pow(2) * ms).sum())
            if cand in kl_at:
                lin.weight.data = w_hat.to(W.dtype)
                try:
                    entry["kl"][cand] = self._divergence(name)
                finally:
                    lin.weight.data = W
        return entry


def _sq_hook(store: dict, name: str):
    def pre(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        store[name] = store.get(name, 0) + x.pow(2).sum(0)
        store[name + "#n"] = store.get(name + "#n", 0) + x.shape[0]
    return pre


def group_stats(model: nn.Module, batches: list, names: list[str]):
    """``(group, InputStats)`` for each group of ``names`` that share an input, block by block:
    the Hessian of the float model's inputs (the model is not changed)."""
    arch = resolve_arch(model)
    wanted = set(names)
    hidden, kws = _capture(model, arch.blocks[0].module, batches)
    for block in arch.blocks:
        groups = [[n for n in g.linears if n in wanted] for g in block.groups]
        groups = [g for g in groups if g]
        stats, hooks = [], []
        for g in groups:
            first = model.get_submodule(g[0])
            st = InputStats(first.in_features, {"hessian"})
            hooks.append(first.register_forward_pre_hook(lambda m, a, st=st: st.add(a[0])))
            stats.append(st)
        try:
            with torch.no_grad():
                hidden = [first_output(block.module(h, **kw))
                          for h, kw in zip(hidden, kws, strict=True)]
        finally:
            for h in hooks:
                h.remove()
        yield from zip(groups, stats, strict=True)


@torch.no_grad()
def solve_candidate(model: nn.Module, group: list[str], st, scheme: Scheme,
                    keep: bool) -> dict[str, tuple[float, torch.Tensor | None]]:
    """``{layer: (tr(dW H dW^T), W_hat or None)}``: the group solved at one candidate
    (``solve_group``, the calls the real run makes), ``W_hat`` in the layer's own basis."""
    H = st.hessian.H.float()
    members = [Member(n, lin, scheme_for_width(scheme, lin.in_features))
               for n, lin in ((n, model.get_submodule(n)) for n in group)]
    out = {}
    for m, sol in zip(members, solve_group(members, st, None), strict=True):
        w_hat = dequantize(sol.codes, sol.qparams)
        if m.scheme.weight.rotation is not None:  # back to the layer's basis
            w_hat = rotate(w_hat.double(), m.scheme.weight.rotation, inverse=True).float()
        dW = m.module.weight.detach().float() - w_hat
        out[m.name] = (float(((dW @ H) * dW).sum()), w_hat if keep else None)
    return out
