"""MinHash dedup on a planted corpus, scored against exact Jaccard computed here.

The corpus (English word documents and Chinese character documents) has families of distinct
documents that share sentences (exact Jaccard about 0.3-0.5 between siblings), near copies
(a few words or characters substituted: about 0.8-0.9 with their source), exact copies, and
exact copies of near copies. Truth: a pair of documents is a duplicate pair when the exact
Jaccard of their shingle sets is >= 0.7. Dedup's answer: two documents are a predicted pair
when they end in one cluster (a removed document's `duplicate_of` names its cluster's kept
document). precision = |predicted & true| / |predicted|, recall = |predicted & true| / |true|,
over all pairs of the corpus. The planted corpus leaves a gap around the threshold (checked),
so the truth does not hinge on where a borderline pair falls.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from internlm2.data.dedup import (
    MinHasher,
    dedup_files,
    exact_dedup,
    jaccard,
    minhash_dedup,
    optimal_bands,
    shingles,
    tokens,
)

DUMPS = ["CC-MAIN-2021-04", "CC-MAIN-2022-21", "CC-MAIN-2023-50", None]


def _english_vocab(rng: random.Random, n: int = 4000) -> list[str]:
    syl = ["ka", "to", "ri", "en", "sa", "mo", "lu", "th", "an", "or", "is", "pe", "di", "ne",
           "qu", "ar", "el", "in", "os", "um", "be", "co", "fa", "gi"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syl) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def _sentence(rng, kind, vocab) -> str:
    if kind == "en":
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14))).capitalize() + "."
    return "".join(rng.choice(vocab) for _ in range(rng.randint(12, 20))) + "。"


def _mutate(rng, text, kind, vocab, edits) -> str:
    if kind == "en":
        words = text.split(" ")
        for p in rng.sample(range(len(words)), edits):
            words[p] = rng.choice(vocab)
        return " ".join(words)
    chars = list(text)
    for p in rng.sample([i for i, c in enumerate(chars) if c != "。"], edits):
        chars[p] = rng.choice(vocab)
    return "".join(chars)


def planted_corpus(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocabs = {"en": _english_vocab(rng), "zh": [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]}
    docs: list[dict] = []

    def add(text, lang):
        docs.append({"id": f"d{len(docs):04d}", "text": text, "lang": lang,
                     "dump": rng.choice(DUMPS), "source": "test"})
        return text

    for kind, families in (("en", 18), ("zh", 10)):
        vocab = vocabs[kind]
        for _ in range(families):
            pool = [_sentence(rng, kind, vocab) for _ in range(22)]
            for _ in range(4):  # siblings: 60-75% of the family's sentences, plus their own
                sents = [s for s in pool if rng.random() < rng.uniform(0.6, 0.75)]
                sents += [_sentence(rng, kind, vocab) for _ in range(4)]
                rng.shuffle(sents)
                sep = " " if kind == "en" else ""
                base = add(sep.join(sents), kind)
                roll = rng.random()
                n_tok = len(tokens(base))
                edits = max(2, round(n_tok * rng.uniform(0.008, 0.016)))
                if roll < 0.35:
                    add(_mutate(rng, base, kind, vocab, edits), kind)
                elif roll < 0.55:
                    add(base, kind)
                elif roll < 0.7:
                    near = add(_mutate(rng, base, kind, vocab, edits), kind)
                    add(near, kind)
    # a few mixed documents (English words around Chinese phrases) with a near copy each
    for _ in range(4):
        text = " ".join(rng.choice(vocabs["en"]) + " " + "".join(rng.choices(vocabs["zh"], k=3))
                        for _ in range(40))
        add(text, "other")
        add(_mutate(rng, text, "en", vocabs["en"], 2), "other")
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order]


@pytest.fixture(scope="module")
def corpus():
    docs = planted_corpus()
    sets = [shingles(d["text"]) for d in docs]
    truth = {}
    for i, j in itertools.combinations(range(len(docs)), 2):
        inter = len(sets[i] & sets[j])
        if inter:
            truth[(i, j)] = inter / len(sets[i] | sets[j])
    return docs, truth


@pytest.fixture(scope="module")
def result(corpus):
    return minhash_dedup(corpus[0], workers=1)


def _clusters(docs, removed) -> dict[str, str]:
    """doc id -> id of the kept document of its cluster."""
    owner = {d["id"]: d["id"] for d in docs}
    for r in removed:
        owner[r["id"]] = r["duplicate_of"]
    return owner


def test_planted_corpus_has_a_gap(corpus):
    _, truth = corpus
    sims = np.array(list(truth.values()))
    assert ((sims >= 0.75) | (sims <= 0.62)).all(), sorted(s for s in sims if 0.62 < s < 0.75)
    assert ((sims >= 0.25) & (sims <= 0.62)).sum() >= 50  # distinct siblings exist
    near = sims[(sims >= 0.75) & (sims < 0.999)]
    assert len(near) >= 30 and np.median(near) < 0.92
    assert (sims >= 0.999).sum() >= 20  # exact copies


def test_precision_recall_against_exact_jaccard(corpus, result):
    docs, truth = corpus
    kept, removed = result
    assert len(kept) + len(removed) == len(docs)
    owner = _clusters(docs, removed)
    index = {d["id"]: i for i, d in enumerate(docs)}
    true_pairs = {p for p, s in truth.items() if s >= 0.7}
    groups: dict[str, list[int]] = {}
    for d in docs:
        groups.setdefault(owner[d["id"]], []).append(index[d["id"]])
    pred_pairs = {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)}
    hit = len(true_pairs & pred_pairs)
    precision, recall = hit / max(1, len(pred_pairs)), hit / max(1, len(true_pairs))
    assert len(true_pairs) >= 60
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    for r in removed:  # every removed document really is close to the one kept for it
        i, k = sorted((index[r["id"]], index[r["duplicate_of"]]))
        assert truth.get((i, k), 0.0) >= 0.7
        assert r["stage"] == "dedup" and r["reason"].startswith(("exact duplicate of",
                                                                  "near-duplicate of"))
        if r["reason"].startswith("near"):
            assert f"of {r['duplicate_of']} (jaccard~" in r["reason"]
            assert abs(r["jaccard"] - truth[(i, k)]) < 0.15


def test_keeps_newest_by_dump_else_first(corpus, result):
    docs, _ = corpus
    kept, removed = result
    owner = _clusters(docs, removed)
    position = {d["id"]: i for i, d in enumerate(docs)}
    by_id = {d["id"]: d for d in docs}
    members: dict[str, list[dict]] = {}
    for d in docs:
        members.setdefault(owner[d["id"]], []).append(d)
    for keeper, group in members.items():
        newest = max((d["dump"] or "") for d in group)
        assert (by_id[keeper]["dump"] or "") == newest
        ties = [d for d in group if (d["dump"] or "") == newest]
        assert keeper == min(ties, key=lambda d: position[d["id"]])["id"]
    assert [d["id"] for d in kept] == [d["id"] for d in docs if owner[d["id"]] == d["id"]]


def test_exact_dedup_and_reasons():
    docs = [{"id": "a", "text": "Same  text here.", "dump": "2020"},
            {"id": "b", "text": "Same text\nhere.", "dump": "2023"},
            {"id": "c", "text": "Same text here.", "dump": "2021"},
            {"id": "d", "text": "Other text."}]
    kept, removed = exact_dedup(docs)
    assert [d["id"] for d in kept] == ["b", "d"]
    assert {r["id"]: r["reason"] for r in removed} == {"a": "exact duplicate of b",
                                                       "c": "exact duplicate of b"}
    kept2, removed2 = minhash_dedup(docs, workers=1)
    assert [d["id"] for d in kept2] == ["b", "d"]
    assert all(r["reason"] == "exact duplicate of b" for r in removed2)
    assert "stage" not in docs[0]  # inputs are not modified
    # the exact key ignores case and whitespace runs, and does not depend on the batch
    h = MinHasher()
    alone = h.analyse(["Café  au\tlait "])["exact"][0]
    assert h.analyse(["中文", "café au lait"])["exact"][1] == alone
    assert h.analyse(["x", "CAFÉ AU LAIT"])["exact"][1] == alone
    assert h.analyse(["cafe au lait"])["exact"][0] != alone


def test_chinese_by_characters():
    assert tokens("我们今天去北京，Hello World！") == [*"我们今天去北京", "hello", "world"]
    rng = random.Random(1)
    text = "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(300))
    near = text[:100] + "的" + text[101:200] + "了" + text[201:]
    assert 0.9 < jaccard(text, near, "zh") < 0.95
    assert jaccard(text, near, "zh") == jaccard(text, near)  # one rule for every document
    other = "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(300))
    kept, removed = minhash_dedup([{"id": "x", "text": text}, {"id": "y", "text": near},
                                   {"id": "z", "text": other}], workers=1)
    assert [d["id"] for d in kept] == ["x", "z"] and removed[0]["duplicate_of"] == "x"


def test_vectorised_shingles_match_reference(corpus):
    docs, _ = corpus
    rng = random.Random(3)
    texts = [d["text"] for d in docs[:60]] + [
        "", "!!!", "one", "Ünïcödé naïve café ΣΊΣΥΦΟΣ ß İstanbul x_y 3.14",
        "a\u0301b c",
        "def f(x):\n    return x  # tabs\tand\tspaces", "🙂 emoji 🙂 text 𠀀𠀁 ext-b",
        "".join(rng.choice("ab 中文。,x\n") for _ in range(500))]
    h = MinHasher()
    keys, doc, ntok, _ = h._keys(texts)
    for i, t in enumerate(texts):
        assert ntok[i] == len(tokens(t)), t
        assert len(np.unique(keys[doc == i])) == len(shingles(t)), t


def test_estimates_are_unbiased(corpus):
    """Pairs share documents, so errors are averaged over a few seeds too."""
    docs, truth = corpus
    pairs = [p for p, s in truth.items() if 0.25 < s < 0.999]
    exact = np.array([truth[p] for p in pairs])
    errors = []
    for seed in range(4):
        sig = MinHasher(seed=seed).signatures([d["text"] for d in docs])
        errors.append(np.array([(sig[i] == sig[j]).mean() for i, j in pairs]) - exact)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.01
    assert errors.std() < 0.045  # binomial: sqrt(J(1-J)/128) <= 0.044


def test_optimal_bands_like_datasketch():
    assert optimal_bands(0.7, 128) == (14, 9)
    lsh = pytest.importorskip("datasketch.lsh")
    for t, n in ((0.5, 64), (0.8, 128), (0.9, 256)):
        assert optimal_bands(t, n) == lsh._optimal_param(t, n, 0.5, 0.5)


def test_workers_and_disk_spill_give_the_same_result(corpus, result, tmp_path):
    docs, _ = corpus

    def summary(res):
        kept, removed = res
        return [d["id"] for d in kept], [(r["id"], r["reason"]) for r in removed]

    base = summary(result)
    assert summary(minhash_dedup(docs, workers=2, shard_chars=1 << 14)) == base
    assert summary(minhash_dedup(docs, workers=2, workdir=tmp_path, shard_chars=1 << 14,
                                 partition_bytes=1 << 12)) == base


def _sig_in_child(text: str) -> list[int]:
    return MinHasher(seed=7).signature(text).tolist()


def test_signature_deterministic_across_processes():
    text = "Deterministic text 中文字符 across processes and interpreters, every time."
    here = MinHasher(seed=7).signature(text)
    assert here.dtype == np.uint32 and here.shape == (128,)
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_sig_in_child, (text,)) == here.tolist()
    code = ("from internlm2.data.dedup import MinHasher;import sys;"
            f"print(MinHasher(seed=7).signature({text!r}).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert json.loads(out.stdout) == here.tolist()
    assert not np.array_equal(MinHasher(seed=8).signature(text), here)


def test_dedup_files_streaming_resumable(corpus, result, tmp_path):
    docs, _ = corpus
    half = len(docs) // 2
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    inputs[0].write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[:half])
                         + "{not json\n")
    inputs[1].write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[half:]))
    out = tmp_path / "out"
    stats = dedup_files(inputs, out, workers=2, chunk_bytes=1 << 15, partition_bytes=1 << 12)
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    assert [d["id"] for d in kept] == [d["id"] for d in result[0]]
    assert kept == result[0]  # kept lines come through unchanged
    assert sorted((r["id"], r["reason"]) for r in removed) == sorted(
        (r["id"], r["reason"]) for r in result[1])
    assert stats["docs_in"] == len(docs) and stats["docs_kept"] == len(kept)
    assert stats["partitions"] > 1 and stats["shards"] > 2
    assert stats["malformed"] == 1
    assert stats["malformed_examples"][0]["file"].endswith("a.jsonl")
    assert stats["malformed_examples"][0]["line"] == half + 1
    assert not (out / ".dedup_work").exists()
    assert dedup_files(inputs, out, workers=2, chunk_bytes=1 << 15,
                       partition_bytes=1 << 12) == stats  # complete: nothing redone

    # a crash after part of the first pass: the finished shards are reused, output identical
    out2, work = tmp_path / "out2", tmp_path / "work"
    dedup_files(inputs, out2, workers=1, chunk_bytes=1 << 15, workdir=work, keep_workdir=True)
    shards = work / "dedup_shards"
    (shards / "info_00001.json").unlink()
    (out2 / "kept.jsonl").unlink()
    stamp = (shards / "sig_00000.npy").stat().st_mtime_ns
    again = dedup_files(inputs, out2, workers=1, chunk_bytes=1 << 15, workdir=work,
                        keep_workdir=True)
    assert (shards / "sig_00000.npy").stat().st_mtime_ns == stamp  # not recomputed
    assert (shards / "info_00001.json").exists()  # recomputed
    assert (out2 / "kept.jsonl").read_text() == (out / "kept.jsonl").read_text()
    assert again["docs_removed"] == stats["docs_removed"]
    dedup_files(inputs, out2, workers=1, chunk_bytes=1 << 16, workdir=work)  # new params: redo
    assert list(work.iterdir()) == []  # only its own folder was made, and it is gone
