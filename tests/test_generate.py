"""The generation loop: cache vs no cache, batching, transformers parity, stops, sampling."""

from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer

import internlm2.generate as generate_module
from internlm2 import decode_step
from internlm2.config import ModelConfig
from internlm2.generate import (
    GenerationConfig,
    IncrementalDecoder,
    StepOutput,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    collect,
    generate,
    generate_text,
    sample_next,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from internlm2.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is far faster

TOKENIZER_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/internlm2_tokenizer.model"

PROMPTS = [[5, 9, 200, 31, 77, 18, 3], [1, 2], [44, 45, 46, 47, 48], [250]]


def small_config(**kw) -> ModelConfig:
    # A larger init std than 0.02 so greedy outputs are varied and logits well separated.
    base = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "initializer_range": 0.2}
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return build_model(small_config(), seed=0).eval()


def greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    """Recompute the full forward every step; no KV cache, no generate()."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def tokens(model, prompts, **kw) -> list[list[int]]:
    kw.setdefault("stop_ids", [])
    return [c.tokens for c in collect(generate(model, prompts, **kw))]


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


# -- correctness of the loop ---------------------------------------------------------------------

def test_greedy_cache_equals_no_cache(model):
    for p in PROMPTS:
        ours = tokens(model, p, max_new_tokens=20)[0]
        assert ours == greedy_no_cache(model, p, 20)
        assert len(set(ours)) > 5  # not a degenerate repeat


def test_batch_equals_each_prompt_alone(model):
    batch = tokens(model, PROMPTS, max_new_tokens=16)
    assert batch == [tokens(model, p, max_new_tokens=16)[0] for p in PROMPTS]


def test_batch_rows_finish_at_different_steps(model):
    """Stop ids end rows early (they are dropped from the batch); the rest carry on unchanged."""
    alone = [tokens(model, p, max_new_tokens=16)[0] for p in PROMPTS]
    stop = alone[0][3]  # row 0 stops at step 4 (or earlier if the token came before)
    out = collect(generate(model, PROMPTS, max_new_tokens=16, stop_ids=[stop]))
    for c, ref in zip(out, alone):
        if stop in ref:
            k = ref.index(stop) + 1
            assert c.tokens == ref[:k] and c.finish_reason == "stop" and c.stop == stop
        else:
            assert c.tokens == ref and c.finish_reason == "length"
    assert out[0].finish_reason == "stop"


def test_steps_report_none_for_finished_rows(model):
    steps = list(generate(model, PROMPTS[:2], max_new_tokens=6, max_length=9, stop_ids=[]))
    # prompt 0 has 7 tokens -> 2 new tokens; prompt 1 has 2 -> 6 new tokens.
    assert len(steps) == 6
    assert [s.tokens[0] is None for s in steps] == [False, False, True, True, True, True]
    assert steps[1].finish_reasons == ["length", None]
    assert steps[5].finish_reasons == [None, "length"]
    assert isinstance(steps[0], StepOutput) and steps[0].token == steps[0].tokens[0]


def test_tensor_input_with_attention_mask(model):
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(PROMPTS[0]), 1
    ids[1, 5:], mask[1, 5:] = torch.tensor(PROMPTS[1]), 1  # left padded
    assert tokens(model, ids, attention_mask=mask, max_new_tokens=8) == \
        tokens(model, PROMPTS[:2], max_new_tokens=8)
    # A 1-D tensor is one prompt.
    assert tokens(model, torch.tensor(PROMPTS[0]), max_new_tokens=4) == \
        tokens(model, [PROMPTS[0]], max_new_tokens=4)


def test_chunked_prefill_identical(model):
    long_prompt = [(7 * i + 3) % 256 for i in range(37)]
    prompts = [long_prompt, PROMPTS[0], PROMPTS[1]]
    full = tokens(model, prompts, max_new_tokens=10)
    for chunk in (1, 5, 16, 64):
        assert tokens(model, prompts, max_new_tokens=10, prefill_chunk=chunk) == full


def test_max_new_tokens_and_length(model):
    c = collect(generate(model, PROMPTS[0], max_new_tokens=5, stop_ids=[]))[0]
    assert len(c.tokens) == 5 and c.finish_reason == "length" and c.stop is None
    c = collect(generate(model, PROMPTS[0], max_new_tokens=50, max_length=10, stop_ids=[]))[0]
    assert len(c.tokens) == 3 and c.finish_reason == "length"
    with pytest.raises(ValueError, match="max_length"):
        generate(model, PROMPTS[0], max_length=7)


def test_stop_ids(model):
    ref = tokens(model, PROMPTS[0], max_new_tokens=20)[0]
    stop = ref[6]
    k = ref.index(stop)
    c = collect(generate(model, PROMPTS[0], max_new_tokens=20, stop_ids=[999, stop]))[0]
    assert c.tokens == ref[:k + 1]  # the stop id is reported as the last token ...
    assert c.output_ids == ref[:k]  # ... but is not part of the output
    assert c.finish_reason == "stop" and c.stop == stop
    # Default stop id: the model's eos.
    eos_model = build_model(small_config(eos_token_id=stop), seed=0).eval()
    c = collect(generate(eos_model, PROMPTS[0], max_new_tokens=20))[0]
    assert c.tokens == ref[:k + 1] and c.finish_reason == "stop"
    # min_new_tokens suppresses stop ids until reached.
    c = collect(generate(model, PROMPTS[0], max_new_tokens=20, min_new_tokens=k + 2,
                         stop_ids=[stop]))[0]
    assert len(c.tokens) > k + 1 and stop not in c.tokens[:k + 2]


def test_stop_ids_text_excludes_stop_token(model):
    tok = CharTokenizer()
    ref = tokens(model, PROMPTS[0], max_new_tokens=20)[0]
    stop = ref[6]
    k = ref.index(stop)
    c = collect(generate(model, PROMPTS[0], max_new_tokens=20, stop_ids=[stop], tokenizer=tok))[0]
    assert c.text == tok.decode(ref[:k])


def test_multi_token_stop_string(model):
    tok = CharTokenizer()
    ref = tokens(model, PROMPTS[0], max_new_tokens=30)[0]
    full = tok.decode(ref)
    stop = full[12:17]  # spans several tokens; may start or end inside a token
    cut = full.find(stop)
    n_needed = next(n for n in range(1, 31) if stop in tok.decode(ref[:n]))
    c = collect(generate(model, PROMPTS[0], max_new_tokens=30, stop_strings=["zzzzzz", stop],
                         tokenizer=tok))[0]
    assert c.finish_reason == "stop" and c.stop == stop
    assert c.text == full[:cut]
    assert c.tokens == ref[:n_needed]  # stopped on the token that completed the string
    # The streamed deltas concatenate to the same text and never contain part of the stop.
    stream = stream_text(model, tok, PROMPTS[0], max_new_tokens=30, stop_strings=[stop])
    deltas = list(stream)
    assert "".join(deltas) == full[:cut] and stream.finish_reason == "stop"
    # Without a tokenizer stop strings cannot work.
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS[0], stop_strings=["a"])


def test_generate_text_and_batch_stream(model):
    tok = CharTokenizer()
    prompts = ["hello", "abc"]
    texts = generate_text(model, tok, prompts, max_new_tokens=8, stop_ids=[])
    ids = [tok.encode(p) for p in prompts]
    assert texts == [tok.decode(t) for t in tokens(model, ids, max_new_tokens=8)]
    assert generate_text(model, tok, "hello", max_new_tokens=8, stop_ids=[]) == texts[0]
    stream = stream_text(model, tok, prompts, max_new_tokens=8, stop_ids=[])
    got = ["", ""]
    for i, delta in stream:
        got[i] += delta
    assert got == texts and [c.finish_reason for c in stream.completions] == ["length"] * 2


# -- sampling -----------------------------------------------------------------------------------

def test_seeded_sampling_reproducible(model):
    kw = {"max_new_tokens": 20, "temperature": 1.0, "stop_ids": []}
    a = tokens(model, PROMPTS, seed=1, **kw)
    assert a == tokens(model, PROMPTS, seed=1, **kw)
    assert a != tokens(model, PROMPTS, seed=2, **kw)
    assert a != tokens(model, PROMPTS, max_new_tokens=20, stop_ids=[])  # not greedy


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = tokens(model, PROMPTS, max_new_tokens=12)
    assert tokens(model, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1, seed=0) == greedy
    assert tokens(model, PROMPTS, max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_penalties_in_batch_match_single(model):
    kw = {"max_new_tokens": 12, "repetition_penalty": 1.3, "presence_penalty": 0.5,
          "frequency_penalty": 0.3}
    batch = tokens(model, PROMPTS, **kw)
    assert batch == [tokens(model, p, **kw)[0] for p in PROMPTS]
    assert batch != tokens(model, PROMPTS, max_new_tokens=12)


def test_repetition_penalty_math():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False], [False, True, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 0.5, -1.0, -2.0]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_presence_frequency_penalty_math():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([[0.0, -0.75, -1.25]]))


def test_top_k_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 2).isinf(), torch.tensor([[True, False, False, True]]))
    assert top_k_filter(logits, 0) is logits
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    lg = probs.log()
    # 0.5 < 0.7 so the 0.3 token is needed too; 0.8 >= 0.7 so the rest are dropped.
    assert torch.equal(top_p_filter(lg, 0.7).isfinite(), torch.tensor([[False, True, True, False]]))
    assert torch.equal(top_p_filter(lg, 0.5).isfinite(), torch.tensor([[False, True, False, False]]))
    assert torch.equal(top_p_filter(lg, 1e-9).isfinite(), torch.tensor([[False, True, False, False]]))


def test_sample_next_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 1e-9]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.02)
    assert sample_next(logits[:1], temperature=0.0).item() == 0


def test_logprobs(model):
    p = PROMPTS[0]
    c = collect(generate(model, p, max_new_tokens=6, logprobs=True, top_logprobs=3,
                         stop_ids=[]))[0]
    full = torch.tensor([p + c.tokens])
    with torch.no_grad():
        ref = torch.log_softmax(model(full)[0, len(p) - 1:-1], -1)
    want = ref.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4)
    for t, top in zip(c.tokens, c.top_logprobs):
        assert len(top) == 3 and top[0][0] == t  # greedy: the best token
    # Log-probs of the warped distribution: top-k=1 makes the sampled token certain.
    c = collect(generate(model, p, max_new_tokens=4, logprobs=True, raw_logprobs=False,
                         temperature=1.0, top_k=1, seed=0, stop_ids=[]))[0]
    assert c.logprobs == [0.0] * 4


def test_config_validation(model):
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(TypeError, match="unknown"):
        generate(model, [1], max_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="outside"):
        generate(model, [1, 256])
    assert GenerationConfig.chat().do_sample and not GenerationConfig().do_sample


# -- text decoding ----------------------------------------------------------------------------

def test_incremental_decoder_never_splits_utf8():
    tok = ByteTokenizer()
    text = "héllo 世界 👋 done"
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(b) for b in text.encode("utf-8")]
    deltas.append(dec.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[text.encode().index("世".encode()):][:3] == ["", "", "世"]


def test_incremental_decoder_holds_partial_stop_strings():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok, stop_strings=["<END>"])
    out = [dec.push(b) for b in b"ab<EN"]
    assert "".join(out) == "ab" and dec.stopped is None  # "<EN" held back
    assert dec.push(ord("x")) == "<ENx"  # not a stop after all
    out = [dec.push(b) for b in b"yz<END>tail"]
    assert "".join(out) == "yz" and dec.stopped == "<END>"
    assert dec.flush() == ""
    # At the end, held-back text that never became a stop string is flushed.
    dec = IncrementalDecoder(tok, stop_strings=["<END>"])
    assert "".join(dec.push(b) for b in b"ok<E") + dec.flush() == "ok<E"


@pytest.mark.skipif(not TOKENIZER_FILE.is_file(), reason="official tokenizer file absent")
def test_incremental_decoder_official_tokenizer():
    from internlm2.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER_FILE)
    prompt = tok.encode("<|im_start|>assistant\n")
    text = "Hello world,  你好，世界! 🚀 x=1234567 <|im_end|>"
    ids = tok.encode(text, add_bos=False)
    dec = IncrementalDecoder(tok, stop_strings=["世界!"], context=prompt)
    out = ""
    for i in ids:
        d = dec.push(i)
        assert "\ufffd" not in d
        out += d
        if dec.stopped:
            break
    assert out == "Hello world,  你好，" and dec.stopped == "世界!"
    dec = IncrementalDecoder(tok, context=prompt)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text


# -- parity with transformers -------------------------------------------------------------------

def _llama_from(model):
    transformers = pytest.importorskip("transformers")
    hf = pytest.importorskip("internlm2.hf")
    cfg = model.config
    ref = transformers.LlamaForCausalLM(
        transformers.LlamaConfig.from_dict(hf.llama_config_dict(cfg)))
    missing, unexpected = ref.load_state_dict(hf.to_llama_state_dict(model.state_dict(), cfg),
                                              strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ref.eval()
    ref.generation_config.eos_token_id = None
    return ref


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers(model):
    ref = _llama_from(model)
    for p in PROMPTS[:3]:
        assert tokens(model, p, max_new_tokens=20)[0] == _hf_greedy(ref, p, 20)


def test_dynamic_rope_beyond_max_positions_equals_transformers():
    cfg = small_config(max_position_embeddings=32, rope_theta=10000.0,
                       rope_scaling={"type": "dynamic", "factor": 2.0})
    model = build_model(cfg, seed=1).eval()
    prompt = [(11 * i + 5) % 256 for i in range(20)]
    ours = tokens(model, prompt, max_new_tokens=30)[0]
    assert ours == _hf_greedy(_llama_from(model), prompt, 30)
    # The scaling matters here: without it the continuation differs.
    plain = build_model(cfg.replace(rope_scaling=None), seed=1).eval()
    assert tokens(plain, prompt, max_new_tokens=30)[0] != ours
    # Chunked prefill keeps one rotary base for the whole prompt.
    assert tokens(model, prompt, max_new_tokens=30, prefill_chunk=7)[0] == ours


# -- compile=True: the static-shape decode step ---------------------------------------------------

def test_static_step_matches_eager(model, monkeypatch):
    """compile=True runs `_decode_step` (fixed-size cache, masked attention, index_put_ writes);
    checked here uncompiled, so the test is fast: tokens and log-probs equal the eager loop's,
    greedy and seeded sampling, and batches fall back to the eager step."""
    calls = []

    def fake_compile(m):
        calls.append(m)
        return decode_step._decode_step

    monkeypatch.setattr(generate_module, "_compile_step", fake_compile)
    prompt = PROMPTS[0]
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        eager = collect(generate(model, prompt, max_new_tokens=20, stop_ids=[], logprobs=True, **kw))
        static = collect(generate(model, prompt, max_new_tokens=20, stop_ids=[], logprobs=True,
                                  compile=True, **kw))
        assert static[0].tokens == eager[0].tokens
        assert static[0].logprobs == pytest.approx(eager[0].logprobs, abs=1e-5)
    assert len(calls) == 2
    # Stop ids still end the row; a budget that crosses the bucket size works.
    stop = eager[0].tokens[4]
    out = collect(generate(model, prompt, max_new_tokens=300, stop_ids=[stop], compile=True))
    assert out[0].tokens == tokens(model, [prompt], max_new_tokens=300, stop_ids=[stop])[0]
    assert len(calls) == 3 and out[0].finish_reason == "stop"
    calls.clear()
    assert tokens(model, PROMPTS, max_new_tokens=6, compile=True) == tokens(model, PROMPTS,
                                                                            max_new_tokens=6)
    assert not calls  # a batch uses the eager step


def test_compiled_step_is_rebuilt_after_weight_update():
    """Freezing bakes the weights into the graph: an in-place update must give a new one."""
    m = build_model(small_config(num_hidden_layers=1), seed=0).eval()
    first = decode_step._compile_step(m)
    assert decode_step._compile_step(m) is first
    with torch.no_grad():
        m.output.weight.add_(1.0)
    assert decode_step._compile_step(m) is not first


@pytest.mark.slow
def test_compiled_decode_identical_tokens():
    """The real torch.compile'd step gives the eager loop's tokens, and still does after an
    in-place weight update (frozen weights must not be reused; the recompile is ~2 s)."""
    m = build_model(small_config(num_hidden_layers=1), seed=0).eval()
    prompt = PROMPTS[2]
    before = tokens(m, [prompt], max_new_tokens=16)
    assert tokens(m, [prompt], max_new_tokens=16, compile=True) == before
    with torch.no_grad():
        m.output.weight.mul_(-1.0)
    after = tokens(m, [prompt], max_new_tokens=16)
    assert after != before
    assert tokens(m, [prompt], max_new_tokens=16, compile=True) == after
