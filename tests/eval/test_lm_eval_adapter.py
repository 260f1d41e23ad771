"""Tests for lowbit.eval.lm_eval_adapter: the scoring functions against the model computed by
hand, the LM methods, and (with lm-eval installed) a tiny local task end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lowbit.eval.lm_eval_adapter import (
    LMEvalError,
    continuation_logprobs,
    greedy_until,
    rolling_windows,
)

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is an optional extra")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    from lowbit.model import load_model, load_tokenizer

    return load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_continuation_logprobs_by_hand_and_batched(tiny) -> None:
    model, _ = tiny
    ctx, cont = [5, 6, 7], [8, 9]
    lp = _logprobs(model, ctx + cont[:-1])
    expected = float(lp[2, 8] + lp[3, 9])
    (score, greedy), = continuation_logprobs(model, [(ctx, cont)], max_length=64)
    assert score == pytest.approx(expected, rel=1e-5)
    greedy_cont = [int(lp[2].argmax())]
    assert continuation_logprobs(model, [(ctx, greedy_cont)], 64)[0][1] is True
    pairs = [(ctx, cont), ([1] * 20, [3, 4, 5]), ([2], [7])]
    batched = continuation_logprobs(model, pairs, 64)
    alone = [continuation_logprobs(model, [p], 64)[0] for p in pairs]
    assert [b[0] for b in batched] == pytest.approx([a[0] for a in alone], rel=1e-5)
    assert greedy is (int(lp[2].argmax()) == 8 and int(lp[3].argmax()) == 9)
    with pytest.raises(LMEvalError, match="empty continuation"):
        continuation_logprobs(model, [(ctx, [])], 64)


@pytest.mark.parametrize("length", [1, 5, 8, 9, 23])
def test_rolling_windows_score_every_token_once(length: int) -> None:
    ids = list(range(100, 100 + length))
    windows = rolling_windows(ids, prefix_id=0, max_length=8)
    assert [t for _, cont in windows for t in cont] == ids
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 8 and ctx
    if importlib.util.find_spec("lm_eval") is not None:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 0, 8, 1)]
        assert windows == theirs
    assert rolling_windows([], 0, 8) == []


def test_greedy_until_matches_generate_and_stops(tiny) -> None:
    model, tok = tiny
    prompt = tok.encode("def main", add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    text = greedy_until(model, prompt, tok.decode, max_new_tokens=6)
    assert text == tok.decode(ref)
    stop = text[2:4]
    if stop:
        assert greedy_until(model, prompt, tok.decode, until=[stop], max_new_tokens=6) == \
            text[: text.index(stop)]


@needs_lm_eval
def test_lowbit_lm_methods(tiny) -> None:
    from lm_eval.api.instance import Instance

    from lowbit.eval.lm_eval_adapter import LowbitLM

    model, tok = tiny
    lm = LowbitLM(model=model, tokenizer=tok, batch_size=2, max_length=64)

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    scores = lm.loglikelihood([req("loglikelihood", "The list", " method"),
                               req("loglikelihood", "x", " = 1")])
    assert len(scores) == 2 and all(s < 0 and isinstance(g, bool) for s, g in scores)
    text = "Lists are mutable sequences."
    ids = lm.tok_encode(text)
    lp = _logprobs(model, [lm.prefix_token_id] + ids[:-1])
    expected = float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(expected, rel=1e-5)
    (out,) = lm.generate_until([req("generate_until", "def f",
                                    {"until": ["\n\n"], "max_gen_toks": 4})])
    assert isinstance(out, str)
    with pytest.raises(LMEvalError, match="greedily"):
        lm.generate_until([req("generate_until", "x", {"do_sample": True})])


@needs_lm_eval
def test_tiny_local_task(tiny, tmp_path: Path) -> None:
    """A two-question multiple-choice task from a local JSONL file, run by lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lowbit.eval.lm_eval_adapter import LowbitLM

    data = tmp_path / "tiny.jsonl"
    docs = [{"question": "Which keyword defines a function?", "choices": [" def", " class"],
             "answer": 0},
            {"question": "Which type is immutable?", "choices": [" list", " tuple"],
             "answer": 1}]
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny.yaml").write_text(
        "task: lowbit_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    model, tok = tiny
    out = lm_eval.simple_evaluate(model=LowbitLM(model=model, tokenizer=tok),
                                  tasks=["lowbit_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path),
                                                           include_defaults=False),
                                  bootstrap_iters=0)
    acc = out["results"]["lowbit_tiny_mc"]["acc,none"]
    assert acc in (0.0, 0.5, 1.0)
