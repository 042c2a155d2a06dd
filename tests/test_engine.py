"""The continuous-batching engine: parity with generate(), paged-KV block accounting,
preemption, prefix caching, chunked prefill, stops, sampling, logprobs, AsyncEngine."""

import asyncio
import itertools

import pytest
import torch

from conftest import CharTokenizer
from internlm2.config import ModelConfig
from internlm2.engine import AsyncEngine, Engine, SamplingParams
from internlm2.generate import collect, generate
from internlm2.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[(7 * i + 3 + k) % 256 for i in range(n)] for k, n in enumerate([7, 2, 37, 5, 20, 1])]
N_NEW = 12


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def ref(model):
    """Greedy tokens of generate() for each prompt alone."""
    return [collect(generate(model, p, max_new_tokens=N_NEW, stop_ids=[]))[0].tokens for p in PROMPTS]


GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)


def flat(lists) -> list:
    return list(itertools.chain.from_iterable(lists))


def all_free(eng: Engine) -> bool:
    return eng.num_free_blocks == eng.num_total_blocks and not eng.has_unfinished()


def run_staggered(eng: Engine, prompts, params=GREEDY) -> dict[str, list]:
    """Add one request per step (so they join a running batch); collect every output."""
    pending = list(enumerate(prompts))
    rids, outs = {}, {}
    while pending or eng.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            rids[eng.add_request(p, params)] = i
        for o in eng.step():
            outs.setdefault(rids[o.request_id], []).append(o)
    return outs


def test_staggered_greedy_equals_generate(model, ref):
    eng = Engine(model, num_blocks=64, block_size=4, prefill_token_budget=64)
    outs = run_staggered(eng, PROMPTS)
    for i, r in enumerate(ref):
        final = outs[i][-1]
        assert final.finished and final.finish_reason == "length"
        assert final.token_ids == r
        # The stream's deltas add up to the final tokens; only the last output is final.
        assert flat(o.new_token_ids for o in outs[i]) == r
        assert [o.finished for o in outs[i]].count(True) == 1
    assert all_free(eng)


def test_chunked_prefill_equals_generate(model, ref):
    eng = Engine(model, num_blocks=64, block_size=4, prefill_token_budget=5)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert all_free(eng)


def test_dynamic_ntk_rope_equals_generate():
    """Past max_position_embeddings the rotary base depends on each sequence's own length."""
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      max_position_embeddings=16, rope_theta=10000.0,
                      rope_scaling={"type": "dynamic", "factor": 2.0})
    m = build_model(cfg, seed=0).eval()
    want = [collect(generate(m, p, max_new_tokens=N_NEW, stop_ids=[]))[0].tokens for p in PROMPTS]
    eng = Engine(m, num_blocks=64, block_size=4, prefill_token_budget=8, session_len=64)
    outs = run_staggered(eng, PROMPTS)
    assert [outs[i][-1].token_ids for i in range(len(PROMPTS))] == want


def test_preemption_under_a_tiny_pool(model, ref):
    # 13 blocks of 4 = 52 slots: the 37-token prompt + 12 new fits alone, not beside others.
    eng = Engine(model, num_blocks=13, block_size=4, prefill_token_budget=16, prefix_caching=False)
    preempted = []
    orig = eng._preempt
    eng._preempt = lambda s: (preempted.append(s.rid), orig(s))
    outs = run_staggered(eng, PROMPTS)
    assert preempted, "the pool was meant to be too small to hold every request"
    for i, r in enumerate(ref):
        assert outs[i][-1].token_ids == r
        # The stream continues seamlessly across the preemption: no token twice or lost.
        assert flat(o.new_token_ids for o in outs[i]) == r
    assert all_free(eng)


def test_abort_frees_blocks_immediately(model):
    eng = Engine(model, num_blocks=32, block_size=4, prefix_caching=False)
    a = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=10, ignore_eos=True))
    b = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=10, ignore_eos=True))
    eng.step(), eng.step()
    used = eng.num_total_blocks - eng.num_free_blocks
    assert used == 10 + 2  # KV of 38 and 8 tokens: ceil(38/4) + ceil(8/4)
    eng.abort(a)
    assert eng.num_total_blocks - eng.num_free_blocks == 2
    outs = {o.request_id: o for o in eng.step()}
    assert outs[a].finished and outs[a].finish_reason == "abort" and len(outs[a].token_ids) == 2
    assert not outs[b].finished
    eng.abort(b)
    eng.abort("no-such-request")  # harmless
    assert all_free(eng) is False  # the abort output is still to be delivered
    assert [o.finish_reason for o in eng.step()] == ["abort"]
    assert all_free(eng)


def test_prefix_caching_shares_blocks(model):
    system = [(5 * i + 1) % 256 for i in range(30)]
    p1, p2 = system + [1, 2, 3], system + [9, 8]
    eng = Engine(model, num_blocks=64, block_size=4)
    first = eng.generate([p1], GREEDY)[0]
    second = eng.generate([p2], GREEDY)[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens == 28  # 7 full blocks of the shared 30-token prefix
    fresh = Engine(model, num_blocks=64, block_size=4, prefix_caching=False).generate([p2], GREEDY)[0]
    assert second.token_ids == fresh.token_ids
    # Finished requests leave their hashed blocks evictable: all still count as free.
    assert all_free(eng)
    # A request that needs evictions takes the least recently used blocks first: p1's own
    # tail, not the shared prefix p2 used last.
    other = [(11 * i + 4) % 256 for i in range(200)]  # 51 of 64 blocks
    out = eng.generate([other], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == collect(generate(model, other, max_new_tokens=4, stop_ids=[]))[0].tokens
    assert eng.generate([p2], GREEDY)[0].cached_tokens == 28
    # One that needs the whole pool evicts everything and is still correct.
    big = [(13 * i + 2) % 256 for i in range(250)]
    out = eng.generate([big], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == collect(generate(model, big, max_new_tokens=6, stop_ids=[]))[0].tokens
    assert eng.generate([p2], GREEDY)[0].cached_tokens == 0
    assert all_free(eng)


def test_stop_token_string_and_length(model, ref):
    stop_id = ref[0][4]
    k = ref[0].index(stop_id)
    eng = Engine(model, tokenizer=CharTokenizer(), num_blocks=64, block_size=4)
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=N_NEW, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[0][:k]
    tok = CharTokenizer()
    full = tok.decode(ref[0])
    # A stop string spanning several tokens, starting mid-token.
    start = len(tok.decode(ref[0][:3])) + 1
    stop = full[start:start + 4]
    assert full.find(stop) == start
    outs = run_staggered(eng, [PROMPTS[0]], SamplingParams(max_tokens=N_NEW, stop=["zzzzzzz", stop],
                                                          ignore_eos=True))[0]
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == full[:start]
    assert "".join(o.new_text for o in outs) == full[:start]
    assert final.token_ids == ref[0][:len(final.token_ids)] and len(final.token_ids) >= 5
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text == tok.decode(out.token_ids)


def test_seeded_sampling_and_penalties(model):
    eng = Engine(model, num_blocks=64, block_size=4)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = eng.generate(PROMPTS[:3], sp)
    b = eng.generate([PROMPTS[1], PROMPTS[0]], sp)  # other batch mates, other order
    assert a[1].token_ids == b[0].token_ids and a[0].token_ids == b[1].token_ids
    other = eng.generate([PROMPTS[0]], SamplingParams(**{**sp.__dict__, "seed": 8}))[0]
    assert other.token_ids != a[0].token_ids
    pen = SamplingParams(max_tokens=N_NEW, repetition_penalty=50.0, ignore_eos=True)
    out = eng.generate([PROMPTS[1]], pen)[0]
    assert len(set(out.token_ids)) == N_NEW and not set(out.token_ids) & set(PROMPTS[1])


def test_logprobs_equal_direct_forward(model):
    eng = Engine(model, num_blocks=64, block_size=4)
    outs = run_staggered(eng, [PROMPTS[2]], SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True))[0]
    out = outs[-1]
    full = torch.tensor([PROMPTS[2] + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(full)[0, len(PROMPTS[2]) - 1:-1], -1)
    lps = flat(o.logprobs for o in outs)  # per step, for that step's new tokens
    assert len(lps) == 5
    for j, t in enumerate(lps):
        assert t.token_id == out.token_ids[j]
        assert t.logprob == pytest.approx(float(lp[j, t.token_id]), abs=1e-4)
        assert [i for i, _ in t.top] == lp[j].topk(3).indices.tolist()


def test_bad_input(model):
    eng = Engine(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        eng.add_request([1, 256], GREEDY)
    with pytest.raises(ValueError, match="session_len"):
        eng.add_request([1] * 30, GREEDY)  # 30 + 12 > 32 slots
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request([1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1], SamplingParams(max_tokens=4, stop=["x"]))
    eng.add_request([1], GREEDY, request_id="r")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], GREEDY, request_id="r")
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, block_size=0, num_blocks=4)


def test_embed_matches_model(model):
    eng = Engine(model, num_blocks=8, block_size=4)
    e = eng.embed([PROMPTS[0], PROMPTS[1]])
    with torch.no_grad():
        h = model(torch.tensor([PROMPTS[1]]), return_hidden=True)[0].mean(0)
    assert e.shape == (2, 64) and e.dtype == torch.float32
    assert torch.allclose(e[1], h, atol=1e-5)


def test_async_engine_concurrent_and_early_exit(model, ref):
    eng = Engine(model, num_blocks=64, block_size=4, prefill_token_budget=16)
    aeng = AsyncEngine(eng)

    async def consume(p):
        outs = [o async for o in aeng.generate(p, GREEDY)]
        return outs

    async def early_exit():
        agen = aeng.generate(PROMPTS[2], SamplingParams(max_tokens=N_NEW + 5, ignore_eos=True))
        async for o in agen:
            if len(o.token_ids) >= 2:
                break
        await agen.aclose()
        for _ in range(200):  # the abort is applied by the engine thread between steps
            if await aeng.call(lambda: eng.num_free_blocks) == eng.num_total_blocks:
                return True
            await asyncio.sleep(0.01)
        return False

    async def main():
        aeng.start()
        try:
            results = await asyncio.gather(*(consume(p) for p in PROMPTS), early_exit())
            emb = await aeng.call(eng.embed, [PROMPTS[0]])
            with pytest.raises(ValueError, match="empty"):
                async for _ in aeng.generate([], GREEDY):
                    pass
            return results, emb
        finally:
            aeng.shutdown()

    results, emb = asyncio.run(main())
    *streams, freed = results
    assert freed and all_free(eng)
    for outs, r in zip(streams, ref):
        assert outs[-1].finished and outs[-1].token_ids == r
        assert flat(o.new_token_ids for o in outs) == r
    assert emb.shape == (1, 64)
