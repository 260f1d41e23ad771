"""Run EleutherAI lm-evaluation-harness (``lm-eval``) tasks on a lowbit model.

    pip install lm-eval
    python -m lowbit.eval.lm_eval_adapter --model lowbit \\
        --model_args model=smollm2-135m,recipe=w4g128 --tasks arc_easy --limit 100

or from Python::

    import lm_eval
    from lowbit.eval.lm_eval_adapter import LowbitLM
    lm_eval.simple_evaluate(model=LowbitLM(model=qmodel, tokenizer=tok), tasks=["arc_easy"])

``LowbitLM`` implements lm-eval's ``LM`` interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) on top of three plain functions that need
only torch and a causal LM (``continuation_logprobs``, ``rolling_windows``, ``greedy_until``),
so they are tested without lm-eval. Importing this module registers the model name
``lowbit`` with lm-eval when lm-eval is installed. Tasks read their data through lm-eval and
``datasets``; lowbit itself downloads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["LMEvalError", "LowbitLM", "continuation_logprobs", "greedy_until",
           "rolling_windows"]

INSTALL = "pip install lm-eval (lowbit's lm-eval adapter needs it)"


class LMEvalError(LowbitError, RuntimeError):
    """lm-eval is missing or was asked for something the adapter cannot do."""


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False) if hasattr(getattr(model, "config", None), "use_cache") \
        else model(ids)
    return (out if torch.is_tensor(out) else out.logits).float()


def continuation_logprobs(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                          max_length: int) -> list[tuple[float, bool]]:
    """For each ``(context_ids, continuation_ids)``: the summed log-probability of the
    continuation after the context and whether greedy decoding would produce it. The input is
    cut from the left to ``max_length`` tokens; the pairs run as one right-padded batch (causal
    attention: padding after a sequence never changes its logits)."""
    rows, spans = [], []
    for ctx, cont in pairs:
        if not cont:
            raise LMEvalError("an empty continuation has no log-likelihood to score")
        whole = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        rows.append(whole)
        spans.append((len(whole) - len(cont), list(cont)))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    with torch.inference_mode():
        logprobs = F.log_softmax(_logits(model, ids), -1)
    results = []
    for i, (start, cont) in enumerate(spans):
        lp = logprobs[i, start: start + len(cont)]
        target = torch.tensor(cont)
        total = float(lp.gather(-1, target[:, None]).sum())
        results.append((total, bool((lp.argmax(-1) == target).all())))
    return results


def rolling_windows(ids: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int],
                                                                                  list[int]]]:
    """Disjoint ``(context, continuation)`` windows that score every token of ``ids`` once,
    each with as much context as fits (lm-eval's ``get_rolling_token_windows`` with
    ``context_len=1`` followed by ``make_disjoint_window``)."""
    if not ids:
        return []
    windows = []
    first = min(max_length, len(ids))
    windows.append(([prefix_id], ids[:first]))
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_length)
        end = done + n
        context = ids[max(0, end - max_length - 1): end - 1]
        windows.append((context[: len(context) - (n - 1)], ids[end - n: end]))
        done = end
    return windows


def greedy_until(model: nn.Module, ids: list[int], decode, *, until: Sequence[str] = (),
                 max_new_tokens: int = 256, eos_id: int | None = None,
                 max_length: int = 2048) -> str:
    """Greedy continuation of ``ids`` (with the KV cache) until a stop string, EOS or
    ``max_new_tokens``; returns the text before the first stop string."""
    ids = list(ids)[-(max_length - max_new_tokens):] if max_new_tokens < max_length else ids
    generated: list[int] = []
    past = None
    step = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if eos_id is not None and token == eos_id:
                break
            generated.append(token)
            text = decode(generated)
            if any(s and s in text for s in until):
                break
            step = torch.tensor([[token]])
    text = decode(generated)
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


try:  # lm-eval is an optional extra
    from lm_eval.api.model import TemplateLM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - depends on the install
    _Base = object

    def _register(*names):
        return lambda cls: cls


@_register("lowbit")
class LowbitLM(_Base):
    """An lm-eval ``LM`` backed by a (quantized) lowbit model.

    ``model``: an ``nn.Module`` (pass its ``tokenizer`` too) or a spec that
    ``lowbit.load_model`` understands; ``recipe``: quantize it first (e.g. ``w4g128``).
    """

    def __init__(self, model="smollm2-135m", recipe: str | None = None, tokenizer=None,
                 batch_size=8, max_length: int | None = None, max_gen_toks: int = 256,
                 **_lm_eval_options) -> None:
        if _Base is object:
            raise LMEvalError(f"lm-eval is not installed: {INSTALL}")
        super().__init__()
        self.model, self.tokenizer = _open(model, recipe, tokenizer)
        self.model.eval()
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self._max_length = int(max_length or min(limit, 2048))
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = []
        for first in range(0, len(requests), self.batch_size):
            batch = requests[first: first + self.batch_size]
            scores = continuation_logprobs(self.model, [(c, x) for _, c, x in batch],
                                           self.max_length)
            for (key, _, _), score in zip(batch, scores, strict=True):
                self.cache_hook.add_partial("loglikelihood", key, score)
            results.extend(scores)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (string,) = req.args
            windows = rolling_windows(self.tok_encode(string), self.prefix_token_id,
                                      self.max_length)
            total = 0.0
            for first in range(0, len(windows), self.batch_size):
                scores = continuation_logprobs(self.model, windows[first: first +
                                                                   self.batch_size],
                                               self.max_length)
                total += sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0:
                raise LMEvalError("lowbit's lm-eval adapter decodes greedily; drop do_sample / "
                                  "temperature from the task's generation_kwargs")
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            text = greedy_until(self.model, self.tok_encode(context), self.tok_decode,
                                until=until, eos_id=self.eot_token_id,
                                max_new_tokens=int(gen_kwargs.get("max_gen_toks",
                                                                  self.max_gen_toks)),
                                max_length=self.max_length)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def _open(model, recipe, tokenizer):
    from lowbit.model import Recipe, load_model, load_tokenizer, quantize

    if not isinstance(model, nn.Module):
        model = load_model(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    if recipe:
        r = Recipe.parse(recipe)
        calibration = None
        if r.needs_calibration:
            from lowbit.data import text

            calibration = text("pydoc", tokenizer, tokens=16384, seq_len=512)
        quantize(model, r, calibration, progress=False)
    return model, tokenizer


if __name__ == "__main__":  # python -m lowbit.eval.lm_eval_adapter --model lowbit ...
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(f"lm-eval is not installed: {INSTALL}") from exc
    cli_evaluate()
