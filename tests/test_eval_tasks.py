import math

import pytest
import torch

from internlm2.config import ModelConfig
from internlm2.eval import perplexity as ppl
from internlm2.eval import tasks
from internlm2.model import build_model

TEXTS = ["Question: What is 12 + 7?\nAnswer: 19", "The color of the apple is 1234.",
         "def add(a, b):\n    return a + b\n", "Hello world, this is a tiny corpus."] * 20


@pytest.fixture(scope="module")
def tok():
    from internlm2.tokenizer import train_tokenizer
    return train_tokenizer(TEXTS, vocab_size=512)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return build_model(cfg, seed=0).eval()


def _direct(model, prefix, cont):
    ids = torch.tensor([prefix + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
    return sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_choice_loglik_matches_direct(model, tok, prefix_cache):
    recs = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
            {"question": "Which is a fruit?", "choices": ["apple pie", "b"], "answer": "A"},
            {"question": "x", "choices": ["one", "two", "three"], "answer": 2}]
    requests = []
    for r in recs:
        p = tok.encode(tasks.mc_prompt(r))
        conts = [tok.encode(" " + c, add_bos=False) for c in r["choices"]]
        requests.append((p, conts))
    got = tasks.score_continuations(model, requests, batch_size=2, prefix_cache=prefix_cache)
    for (p, conts), scores in zip(requests, got):
        assert len(scores) == len(conts)
        for c, s in zip(conts, scores):
            assert s == pytest.approx(_direct(model, p, c), abs=1e-4)


def test_extract_answer_and_tool_scoring():
    assert tasks.extract_answer("so 3 + 4 = 7, then 7 * 2 = 14") == "14"
    assert tasks.extract_answer("The answer is 1,234.") == "1234"
    assert tasks.extract_answer("blah\n#### 42") == "42"
    assert tasks.extract_answer("the answer is Paris.") == "Paris"
    assert tasks.answers_match("I think the answer is 14.0", "14")
    assert not tasks.answers_match("15", "14")
    assert tasks.answers_match("answer is paris", "Paris")
    exp = {"name": "get_weather", "arguments": {"city": "Paris"}}
    ok = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|action_end|>'
    assert tasks.score_tool_call(ok, exp) == {"name": True, "arguments": True}
    bad_args = ok.replace("Paris", "Rome")
    assert tasks.score_tool_call(bad_args, exp) == {"name": True, "arguments": False}
    assert tasks.score_tool_call(ok.replace("get_weather", "search"), exp) == \
        {"name": False, "arguments": False}
    assert tasks.score_tool_call("It is sunny.", exp) == {"name": False, "arguments": False}


def test_perplexity_full_window_matches_direct(model, tok):
    texts = TEXTS[:3]
    res = ppl.perplexity(model, tok, {"a": texts}, window=512, stride=256, batch_size=2)["a"]
    nats = tokens = 0
    for t in texts:
        ids = tok.encode(t)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)
        nats -= float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        tokens += len(ids) - 1
    assert res["tokens"] == tokens
    assert res["nats_per_token"] == pytest.approx(nats / tokens, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)


def test_perplexity_small_window_counts_and_bpb(model, tok):
    texts = [" ".join(TEXTS[:6])]
    n = len(tok.encode(texts[0]))
    for window, stride in [(8, 3), (8, 8), (5, 1)]:
        spans = ppl.window_spans(n, window, stride)
        scored = [p for _, e, f in spans for p in range(f, e)]
        assert sorted(scored) == list(range(1, n))
        assert all(e - b <= window for b, e, _ in spans)
        res = ppl.perplexity(model, tok, {"a": texts, "b": texts[:1]}, window=window,
                             stride=stride)
        r = res["a"]
        assert r["tokens"] == n - 1
        nbytes = len(texts[0].encode("utf-8"))
        assert r["bytes"] == nbytes
        assert r["bits_per_byte"] == pytest.approx(
            r["nats_per_token"] * r["tokens"] / (math.log(2) * nbytes), rel=1e-9)
        assert "all" in res


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y", "source": "web"}\n',
                                      encoding="utf-8")
    got = ppl.read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert got == {"a": ["hello"], "b": ["x"], "web": ["y"]}


def test_code_runner():
    rec = tasks._CODE_TASKS[0]
    assert tasks.run_code(tasks.code_program(rec, "    return a + b\n"))["passed"]
    bad = tasks.run_code(tasks.code_program(rec, "    return a - b\n"))
    assert not bad["passed"] and bad["status"] == "failed"
    loop = tasks.run_code(tasks.code_program(rec, "    while True:\n        pass\n"), timeout=1.0)
    assert loop["status"] == "timeout" and not loop["passed"]


def test_generated_tasks_run(model, tok, tmp_path):
    files = tasks.generate_task_files(tmp_path, seed=0, n=4)
    assert set(files) == {"arith_mc", "arith_gen", "kv_mc", "tool_calls", "code"}
    assert tasks.load_task_files([tmp_path]) == files
    res = tasks.run_tasks(model, tok, files, shots=1, batch_size=4, limit=3)
    for name, r in res.items():
        assert 0.0 <= r["score"] <= 1.0, name
        assert r["count"] == 3
        assert r["samples"]
