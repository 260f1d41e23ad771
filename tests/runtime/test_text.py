"""``lowbit.generate``: text from the runtime (or the model's own ``generate``) equals what
transformers' ``generate`` gives on the same model; sampling is seeded; streaming is exact.

Random 2-layer models with a wide initialisation (``initializer_range=0.3``) so that greedy
text varies token to token rather than repeating one token.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.runtime import generate as generate_ids
from lowbit.runtime.text import GenerateError, TextStats, _TextStream, encode_prompt, generate

transformers = pytest.importorskip("transformers")

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return transformers.PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)


def llama(vocab: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, initializer_range=0.3,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_text(model, tok, prompt: str, n: int) -> str:
    ids = encode_prompt(tok, prompt)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True,
                      clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("make, engine", [(llama, "lowbit.runtime"),
                                          (gpt2, "transformers generate")])
def test_greedy_text_equals_transformers_and_stream_joins_to_it(make, engine, tok) -> None:
    model = make()
    pieces: list[str] = []
    text, stats = generate(model, tok, PROMPT, 16, stream=pieces.append)
    assert isinstance(stats, TextStats) and stats.engine.startswith(engine)
    assert text == hf_text(model, tok, PROMPT, 16) and len(set(text)) > 3
    assert "".join(pieces) == text and len(pieces) > 1
    assert stats.new_tokens == 16 and stats.prompt_tokens == encode_prompt(tok, PROMPT).shape[1]
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0
    assert sum(stats.kernels.values()) >= 1
    assert (stats.fallback is None) == (engine == "lowbit.runtime")
    if stats.fallback:
        assert "gpt2" in stats.fallback


@pytest.mark.parametrize("make", [llama, gpt2])
def test_sampling_is_seeded_and_leaves_the_global_generator_alone(make, tok) -> None:
    model = make()
    state = torch.random.get_rng_state()
    a = generate(model, tok, PROMPT, 12, temperature=1.0, seed=1)[0]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate(model, tok, PROMPT, 12, temperature=1.0, seed=1)[0]
    assert a != generate(model, tok, PROMPT, 12, temperature=1.0, seed=2)[0]
    greedy = generate(model, tok, PROMPT, 12)[0]
    assert generate(model, tok, PROMPT, 12, temperature=1.0, top_p=1e-6, seed=3)[0] == greedy


def test_lazy_public_name() -> None:
    assert lowbit.generate is generate and "generate" in dir(lowbit)


def test_token_hooks_see_every_new_token_and_eos_may_be_several_ids() -> None:
    model, ids = llama(), torch.tensor([[5, 6, 7]])
    seen: list[int] = []
    full, _ = generate_ids(model, ids, 10, dtype=torch.float32,
                           on_token=lambda column: seen.append(int(column[0])))
    assert seen == full[0, 3:].tolist()
    stop = int(full[0, 6])
    first = full[0, 3:].tolist().index(stop) + 3
    cut, _ = generate_ids(model, ids, 10, dtype=torch.float32, eos_token_id=[299, stop])
    assert torch.equal(cut, full[:, : first + 1])
    fixed, _ = generate_ids(model, ids, 4, dtype=torch.float32,
                            next_token=lambda logits: torch.full(logits.shape[:1], 9))
    assert fixed[0, 3:].tolist() == [9, 9, 9, 9]


def test_stream_never_hands_out_half_a_character(tok) -> None:
    ids = tok("naïve → 😀 café", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("naïve → 😀 café") - 6  # bytes, not whole characters, as tokens
    pieces: list[str] = []
    stream = _TextStream(tok, pieces.append)
    for i in ids:
        stream.put(i)
    assert stream.end() == "naïve → 😀 café" == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)


def test_chat_wraps_one_user_turn_in_the_template(tok) -> None:
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %} ->{% endif %}")
    got = encode_prompt(chat_tok, "hi", chat=True)
    assert got[0].tolist() == tok("<s>hi ->", add_special_tokens=False)["input_ids"]
    text, _ = generate(llama(), chat_tok, "hi", 4, chat=True)
    assert isinstance(text, str)


def test_bad_input_is_refused_clearly(tok) -> None:
    model = llama()
    with pytest.raises(GenerateError, match="prompt is empty"):
        generate(model, tok, "  ", 4)
    with pytest.raises(GenerateError, match=r"limit of 64 positions.*--max-new-tokens\) to \d+"):
        generate(model, tok, PROMPT, 60)
    with pytest.raises(GenerateError, match="needs a chat template"):
        generate(model, tok, PROMPT, 4, chat=True)
    with pytest.raises(GenerateError, match="at least 1"):
        generate(model, tok, PROMPT, 0)
    with pytest.raises(GenerateError, match="temperature"):
        generate(model, tok, PROMPT, 4, temperature=-1)
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).eval()
    with pytest.raises(GenerateError, match="not a causal language model"):
        generate(encoder, tok, PROMPT, 4)
