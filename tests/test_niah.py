"""Needle in a haystack: prompt building, scoring, chunked prefill, resumable runs, reports."""

import dataclasses
import json
import re

import pytest
import torch

from internlm2.config import ModelConfig
from internlm2.eval import niah
from internlm2.eval.niah import (
    DEFAULT_NEEDLES,
    Needle,
    build_context,
    depths,
    exact_score,
    heatmap,
    levenshtein,
    levenshtein_score,
    load_haystack,
    load_needles,
    markdown_table,
    parse_lengths,
    run_niah,
    split_sentences,
    summarize,
)
from internlm2.model import build_model
from internlm2.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ENDS = tuple(".!?。！？\n")


@pytest.fixture(scope="module")
def hay():
    return load_haystack(None, "en", min_chars=30_000)


@pytest.fixture(scope="module")
def tok(hay):
    zh = load_haystack(None, "zh", min_chars=5_000)
    texts = [hay, zh] + [n.needle + " " + n.question for ns in DEFAULT_NEEDLES.values() for n in ns]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG, seed=0).eval()


def test_split_sentences_roundtrip():
    text = "One. Two!  Three?\nFour 四。五！\n\nsix"
    parts = split_sentences(text)
    assert "".join(parts) == text
    assert parts[0] == "One." and parts[1] == " Two!" and parts[-1] == "six"


@pytest.mark.parametrize("chat", [False, True])
def test_lengths_exact(tok, hay, chat):
    for length in (200, 257, 512, 1000):
        for d in (0, 37, 100):
            p = build_context(tok, hay, DEFAULT_NEEDLES["en"][0], length, d, chat=chat)
            assert len(p.ids) == length
            assert all(0 <= i < tok.vocab_size for i in p.ids)
    # multi-needle and Chinese, too
    p = build_context(tok, hay, DEFAULT_NEEDLES["zh"][:3], 700, 20)
    assert len(p.ids) == 700 and len(p.needle_positions) == 3
    with pytest.raises(ValueError, match="no room"):
        build_context(tok, hay, DEFAULT_NEEDLES["en"][0], 20, 50)


def test_chat_and_plain_templates(tok, hay):
    n = DEFAULT_NEEDLES["en"][1]
    plain = tok.decode(build_context(tok, hay, n, 300, 50).ids)
    assert plain.endswith(f"Question: {n.question}\nAnswer:") and n.needle in plain
    chat = tok.decode(build_context(tok, hay, n, 300, 50, chat=True).ids)
    assert chat.startswith("<s><|im_start|>user\n")
    assert chat.endswith("<|im_end|>\n<|im_start|>assistant\n") and n.question in chat


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_depth_placement(tok, hay, depth):
    needle = DEFAULT_NEEDLES["en"][0]
    length = 800
    p = build_context(tok, hay, needle, length, depth)
    pos = p.needle_positions[0]
    nid = tok.encode(f"\n{needle.needle}\n", add_bos=False)
    assert p.ids[pos:pos + len(nid)] == nid
    head = 1  # BOS
    hay_pos = pos - head
    target = round(depth / 100 * p.haystack_tokens)
    assert hay_pos <= target
    # Within one sentence: no sentence ends between the needle and the asked point, i.e. the
    # needle went in at the start of the sentence that holds the asked point.
    after = tok.decode(p.ids[pos + len(nid):pos + len(nid) + target - hay_pos])
    assert not any(c in after for c in ENDS), after
    assert (target - hay_pos) / length < 0.15
    # It starts right after a sentence boundary (or at the start of the haystack).
    if hay_pos > 0:
        before = re.sub(r"[\"')”’）」』]+$", "", tok.decode(p.ids[head:pos]))
        assert before.endswith(ENDS), before[-40:]


def test_multi_needles_spread(tok, hay):
    ns = DEFAULT_NEEDLES["en"][:3]
    p = build_context(tok, hay, ns, 900, 40)
    assert p.needle_depths == pytest.approx([40, 60, 80])
    assert p.needle_positions == sorted(p.needle_positions)
    text = tok.decode(p.ids)
    assert [text.index(n.needle) for n in ns] == sorted(text.index(n.needle) for n in ns)
    assert all(n.question in text for n in ns)


def test_grids():
    assert depths(5) == [0, 25, 50, 75, 100]
    s = depths(7, "sigmoid")
    assert s[0] == 0 and s[-1] == 100 and s == sorted(s) and s[3] == 50
    assert s[1] < 100 / 6  # denser near the ends than linear
    assert parse_lengths("1k,2k,4k") == [1024, 2048, 4096]
    assert parse_lengths("1000, 1.5k") == [1000, 1536]
    assert parse_lengths([512, "2k"]) == [512, 2048]
    with pytest.raises(ValueError):
        parse_lengths("abc")
    with pytest.raises(ValueError):
        depths(3, "cubic")


def test_scores():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert exact_score("The code is 48213.", "48213") == 1.0
    assert exact_score("It is 48,213!", "48213") == 1.0  # punctuation normalised away
    assert exact_score("4821", "48213") == 0.0
    assert exact_score("密码是四八", "48213") == 0.0
    assert exact_score("答案：ＡＢＣ", "abc") == 1.0  # NFKC + case
    assert levenshtein_score("48213", "48213") == 1.0
    assert levenshtein_score("48212", "48213") == pytest.approx(0.8)
    assert levenshtein_score("The code is 48293 I think", "48213") == pytest.approx(0.8)
    assert levenshtein_score("", "48213") == 0.0
    assert levenshtein_score("4821", "48213") == pytest.approx(0.8)
    assert levenshtein_score("zzzzzzzz", "48213") == 0.0
    s = niah.score_prediction("it is 48212", ["48213"])
    assert s == {"exact": 0.0, "levenshtein": pytest.approx(0.8), "score": pytest.approx(0.4)}
    assert niah.score_prediction("48213", ["48213"])["score"] == 1.0
    two = niah.score_prediction("48213 and 7000", ["48213", "7365"])
    assert two["exact"] == 0.5


def test_load_needles(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"needle": "A is 1.", "question": "What is A?", "answer": 1}\n\n'
                 '{"needle": "甲是二。", "question": "甲是什么？", "answer": "二", "lang": "zh"}\n',
                 encoding="utf-8")
    ns = load_needles(f)
    assert ns == [Needle("A is 1.", "What is A?", "1", "en"), Needle("甲是二。", "甲是什么？", "二", "zh")]
    f.write_text('{"needle": "A is 1.", "question": "What is A?", "answer": "1"}\n'
                 '{"needle": "B", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r":2: field 'question'"):
        load_needles(f)
    f.write_text('{"needle": "A"\n')
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        load_needles(f)


def _prefill_last_logits(m, ids, chunk):
    t = ids.shape[1]
    cache = m.new_cache(1, t)
    with torch.inference_mode():
        for s in range(0, t, chunk):
            out = m(ids[:, s:s + chunk], cache=cache, logits_to_keep=1, rope_seq_len=t)
    return out[0, -1]


@pytest.mark.parametrize("rope", [None, {"type": "dynamic", "factor": 2.0}])
def test_chunked_prefill_matches_one_shot(tok, hay, rope):
    # max_position_embeddings below the prompt so dynamic NTK actually rescales.
    cfg = dataclasses.replace(CFG, max_position_embeddings=128, rope_scaling=rope)
    m = build_model(cfg, seed=1).eval()
    prompt = build_context(tok, hay, DEFAULT_NEEDLES["en"][0], 300, 50).ids
    ids = torch.tensor([prompt])
    one = _prefill_last_logits(m, ids, 300)
    chunked = _prefill_last_logits(m, ids, 64)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        full = m(ids)[0, -1]  # no cache at all
    torch.testing.assert_close(one, full, atol=1e-4, rtol=1e-4)
    if rope:  # the rescaled base is really in use: differs from the unscaled model
        m.config.rope_scaling = None
        with torch.inference_mode():
            plain = m(ids)[0, -1]
        m.config.rope_scaling = cfg.rope_scaling
        assert not torch.allclose(plain, full, atol=1e-4)


class _Counter:
    def __init__(self, m):
        self.prefills = 0
        m.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        if args[0].shape[1] > 1:  # a prefill chunk (decode steps feed one token)
            self.prefills += 1


def test_run_niah_resumable(tok, hay, model, tmp_path):
    out = tmp_path / "niah.jsonl"
    counter = _Counter(model)
    kw = {"haystack": hay, "max_new_tokens": 3, "prefill_chunk": 64}
    lens, deps, needles = [96, 160], [0, 50, 100], DEFAULT_NEEDLES["en"]
    # "Interrupted": only the first length ran, and the last line was torn mid-write.
    first = run_niah(model, tok, lens[:1], deps, needles, 2, out, **kw)
    assert len(first) == 6 and counter.prefills > 0
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    n0 = counter.prefills
    rows = run_niah(model, tok, lens, deps, needles, 2, out, **kw)
    assert len(rows) == 12
    # 1 torn cell + 6 cells of the second length; 96 tokens = 2 chunks, 160 = 3 chunks
    assert counter.prefills - n0 == 1 * 2 + 6 * 3
    keys = {(r["length"], r["depth"], r["repeat"], r["needle_index"], r["multi"]) for r in rows}
    assert len(keys) == 12
    for r in rows:
        assert r["prompt_tokens"] == r["length"]
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["prediction"], str)
        assert r["needle_index"] == r["repeat"] % len(needles)
    # A second full run does nothing.
    n1 = counter.prefills
    again = run_niah(model, tok, lens, deps, needles, 2, out, **kw)
    assert counter.prefills == n1 and len(again) == 12
    on_disk = [json.loads(x) for x in out.read_text().splitlines() if x.strip().endswith("}")]
    assert len(on_disk) == 12
    # multi-needle cells are new keys
    multi = run_niah(model, tok, lens[1:], [50], needles, 1, out, multi=2, **kw)
    assert counter.prefills - n1 == 3 and len(multi) == 13
    assert [len(r["answers"]) for r in multi if r["multi"] == 2] == [2]


def test_reports(tmp_path):
    rows = []
    for length, base in ((1024, 1.0), (2048, 0.5)):
        for depth in (0.0, 50.0, 100.0):
            for rep in range(2):
                rows.append({"length": length, "depth": depth, "repeat": rep, "needle_index": 0,
                             "multi": 1, "score": base if depth != 100 else 0.0})
    s = summarize(rows)
    assert s["cells"][(1024, 0.0)] == 1.0 and s["cells"][(2048, 100.0)] == 0.0
    assert s["by_length"] == {1024: pytest.approx(2 / 3), 2048: pytest.approx(1 / 3)}
    assert s["overall"] == pytest.approx(0.5) and s["n"] == 12
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| depth \\ length | 1k | 2k | avg |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0%", "50%", "100%", "avg"]
    assert lines[2] == "| 0% | 100.0 | 50.0 | 75.0 |"
    assert lines[-1] == "| avg | 66.7 | 33.3 | 50.0 |"
    png = tmp_path / "niah.png"
    pytest.importorskip("matplotlib")
    assert heatmap(rows, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, tok, monkeypatch):
    import argparse

    from internlm2.hf import save_model

    mdir = tmp_path / "m"
    save_model(build_model(CFG, seed=0), mdir, tokenizer=tok)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    niah.add_cli(sub)
    out = tmp_path / "out"
    args = parser.parse_args(["niah", "--model", str(mdir), "--lengths", "96,128", "--depths", "2",
                              "--repeats", "1", "--rope-scaling", "dynamic", "--factor", "2",
                              "--max-new-tokens", "2", "--dtype", "float32", "--out", str(out),
                              "--prefill-chunk", "64"])
    assert args.func(args) == 0
    assert (out / "niah.jsonl").exists() and (out / "niah.md").exists()
    assert (out / "niah.png").exists()
    assert len((out / "niah.md").read_text().splitlines()) == 2 + 2 + 1


def test_answer_lead_in(tok, hay, tmp_path):
    """Single-needle prompts can end with the needle's lead-in (the passkey form), derived
    from the needle when it ends with its answer; multi-needle prompts never do."""
    en, zh = DEFAULT_NEEDLES["en"][0], DEFAULT_NEEDLES["zh"][1]
    assert en.answer_lead == "The secret code of the blue door is"
    assert zh.answer_lead == "旧灯塔的房间号是"
    assert all(n.answer_lead for ns in DEFAULT_NEEDLES.values() for n in ns)
    assert Needle("42 is the answer.", "What is it?", "42").answer_lead is None
    assert Needle("x", "q?", "7", lead="The value is ").answer_lead == "The value is"
    for n, tail in ((en, f"Answer: {en.answer_lead}"), (zh, f"答案：{zh.answer_lead}")):
        for length in (300, 401):
            p = build_context(tok, hay, n, length, 50, lead=True)
            assert len(p.ids) == length
            assert tok.decode(p.ids).endswith(f"{n.question}\n{tail}")
    chat = tok.decode(build_context(tok, hay, en, 300, 50, chat=True, lead=True).ids)
    assert chat.endswith(f"<|im_start|>assistant\n{en.answer_lead}")
    multi = tok.decode(build_context(tok, hay, DEFAULT_NEEDLES["en"][:2], 400, 0, lead=True).ids)
    assert multi.endswith("?\nAnswer:")
    # needles files may carry a lead; a bad one is named
    f = tmp_path / "n.jsonl"
    f.write_text(json.dumps({"needle": "N is 5.", "question": "Q?", "answer": "5", "lead": 3}) + "\n")
    with pytest.raises(ValueError, match="lead"):
        load_needles(f)
    f.write_text(json.dumps({"needle": "N is 5.", "question": "Q?", "answer": "5",
                             "lead": "Its value is"}) + "\n")
    assert load_needles(f)[0].answer_lead == "Its value is"


def test_run_niah_records_lead_and_refuses_to_mix(tok, hay, model, tmp_path):
    out = tmp_path / "niah.jsonl"
    kw = {"haystack": hay, "max_new_tokens": 2, "prefill_chunk": 64}
    rows = run_niah(model, tok, [96], [50], DEFAULT_NEEDLES["en"], 1, out, **kw)
    assert rows[0]["lead"] is True
    with pytest.raises(ValueError, match="lead=True"):
        run_niah(model, tok, [96], [50], DEFAULT_NEEDLES["en"], 1, out, lead=False, **kw)
    plain = run_niah(model, tok, [96], [50], DEFAULT_NEEDLES["en"], 1, tmp_path / "b.jsonl",
                     lead=False, **kw)
    assert plain[0]["lead"] is False
    # a needle without a lead-in among ones with it: its rows say False, and resuming with the
    # same settings goes on
    mixed = [Needle("42 is the answer.", "What is it?", "42"), DEFAULT_NEEDLES["en"][0]]
    first = run_niah(model, tok, [96], [50], mixed, 2, tmp_path / "m.jsonl", **kw)
    assert [r["lead"] for r in first] == [False, True]
    assert len(run_niah(model, tok, [96, 128], [50], mixed, 2, tmp_path / "m.jsonl", **kw)) == 4
