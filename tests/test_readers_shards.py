"""Readers (every input format, malformed lines reported) and tokenized shards + packing."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from internlm2.data import shards as shards_mod
from internlm2.data.readers import (
    InputPart,
    ReadReport,
    iter_jsonl_shards,
    read_code_repository,
    read_documents,
    read_part,
    split_inputs,
)
from internlm2.data.shards import (
    IGNORE_INDEX,
    MixtureSampler,
    PackedDataset,
    TokenShards,
    collate,
    pack,
    read_manifest,
    split_of,
    write_token_shards,
)
from internlm2.tokenizer import (
    SAMPLE_TEXTS,
    load_tokenizer,
    synthetic_chinese,
    train_tokenizer,
)

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared/data/internlm2_tokenizer.model"

WORDS = ["the", "river", "runs", "past", "old", "stone", "houses", "while", "children", "play", "near", "the", "bridge", "and", "merchants", "count", "their", "coins", "at", "the", "market", "before", "the", "evening", "bell"]


def _english(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, size=n_words).tolist()) + "."


def _corpus(n: int = 120, seed: int = 0) -> list[dict]:
    """Documents of very different lengths (some far longer than the packing length)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        if i % 3 == 2:
            text = synthetic_chinese(int(rng.integers(1, 6)), seed=i)
            src = "zh"
        else:
            text = _english(rng, int(rng.integers(1, 12 if i % 5 else 120)))
            src = "en"
        docs.append({"id": f"doc-{i}", "text": text, "source": src, "lang": src})
    return docs


@pytest.fixture(scope="module")
def tok():
    texts = [synthetic_chinese(150, seed=s) for s in range(4)] + list(SAMPLE_TEXTS.values())
    texts += [_english(np.random.default_rng(s), 300) for s in range(4)]
    return train_tokenizer(texts, vocab_size=512)


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> None:
    """rows as JSON lines; raw_lines {position: bytes} inserted as they are (malformed)."""
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_bytes(b"".join(lines))


# -- readers -----------------------------------------------------------------------------------

def test_jsonl_malformed_lines_reported(tmp_path):
    rows = [{"text": f"document number {i}", "url": f"https://e.com/{i}"} for i in range(6)]
    rows[2]["id"] = 7  # a non-string id is kept, as a string
    path = tmp_path / "data.jsonl"
    # line 3: broken JSON, line 6: no text field, line 8: undecodable bytes, line 9: blank
    _write_jsonl(path, rows, {2: b'{"text": "unterminated\n', 5: b'{"body": "no text"}\n',
                              7: b'{"text": "\xff\xfe bad"}\n', 8: b"\n"})
    report = ReadReport()
    docs = list(read_documents([path], report=report))
    assert [d["text"] for d in docs] == [r["text"] for r in rows]
    assert report.num_docs == 6 and report.num_errors == 3
    assert [(e.file, e.line, e.kind) for e in report.errors] == [
        (str(path), 3, "json"), (str(path), 6, "missing_text"), (str(path), 8, "decode")]
    assert "data.jsonl:3" in str(report.errors[0])
    assert all(d["source"] == str(path) for d in docs)
    assert docs[2]["id"] == "7" and docs[0]["url"] == "https://e.com/0"
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == 6
    assert ids == [d["id"] for d in read_documents(path)]  # stable across reads
    # another text field name
    alt = tmp_path / "alt.jsonl"
    _write_jsonl(alt, [{"content": "hello", "source": "mine"}, {"text": "no content"}])
    rep = ReadReport()
    got = list(read_documents(alt, text_key="content", report=rep))
    assert got == [{"text": "hello", "source": "mine", "id": got[0]["id"]}]
    assert rep.error_counts == {"missing_text": 1}


def test_jsonl_gz_and_truncated(tmp_path):
    rows = [{"text": f"gz doc {i}"} for i in range(50)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    assert [d["text"] for d in read_documents(tmp_path / "a.jsonl.gz")] == [r["text"] for r in rows]
    packed = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    report = ReadReport()
    docs = list(read_documents(tmp_path / "cut.jsonl.gz", report=report))  # no crash
    assert len(docs) < 50 and report.error_counts["io"] == 1
    assert report.errors[0].line == len(docs) + 1


def test_jsonl_zst(tmp_path):
    zstd = pytest.importorskip("zstandard", reason="zstandard not installed (pip install zstandard)")
    rows = [{"text": f"zst doc {i}", "lang": "en"} for i in range(30)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"not json\n"
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(data))
    report = ReadReport()
    docs = list(read_documents(tmp_path / "a.jsonl.zst", report=report))
    assert [d["text"] for d in docs] == [r["text"] for r in rows]
    assert [(e.line, e.kind) for e in report.errors] == [(31, "json")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["first", None, "third"], "url": ["u1", "u2", "u3"]})
    pq.write_table(table, tmp_path / "t.parquet")
    report = ReadReport()
    docs = list(read_documents(tmp_path / "t.parquet", report=report))
    assert [(d["text"], d["url"]) for d in docs] == [("first", "u1"), ("third", "u3")]
    assert [(e.line, e.kind) for e in report.errors] == [(2, "text_type")]
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    report = ReadReport()
    assert list(read_documents(tmp_path / "bad.parquet", report=report)) == []
    assert report.error_counts["io"] == 1


def test_text_files_and_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("Para one\nstill one.\n\n\nPara two.\n\nPara three.\n")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken\n")
    docs = list(read_documents(tmp_path / "a.txt"))
    assert len(docs) == 1 and docs[0]["text"].startswith("Para one")
    report = ReadReport()
    paras = list(read_documents([tmp_path / "a.txt", tmp_path / "bad.txt"], paragraphs=True,
                                report=report))
    assert [d["text"] for d in paras] == ["Para one\nstill one.", "Para two.", "Para three.", "ok"]
    assert len({d["id"] for d in paras}) == 4
    assert [(Path(e.file).name, e.line, e.kind) for e in report.errors] == [("bad.txt", 3, "decode")]
    report = ReadReport()
    assert list(read_documents(tmp_path / "bad.txt", report=report)) == []  # whole file
    assert report.errors[0].line == 3


def test_folder_recursive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "a.txt").write_text("a text")
    (tmp_path / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "c1"}\n'))
    (tmp_path / "sub" / "deeper" / "d.md").write_text("# d")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden" / "e.jsonl").write_text('{"text": "hidden"}\n')
    report = ReadReport()
    docs = list(read_documents(tmp_path, report=report))
    assert [d["text"] for d in docs] == ["a text", "b1", "b2", "c1", "# d"]
    assert [Path(f).name for f, _ in report.skipped] == ["image.png"]
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown input type"):
        list(read_documents(tmp_path / "sub" / "image.png"))


def test_code_repository(tmp_path):
    repo = tmp_path / "myrepo"
    (repo / ".git").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / "node_modules" / "dep").mkdir(parents=True)
    (repo / "README.md").write_text("# My repo\n")
    (repo / "pkg" / "__init__.py").write_text("from .core import run\n")
    (repo / "pkg" / "core.py").write_text("def run():\n    return 1\n")
    (repo / "node_modules" / "dep" / "index.js").write_text("module.exports = 1;\n")
    (repo / "pkg" / "blob.py").write_bytes(b"\x00\x01binary")
    (repo / "pkg" / "huge.py").write_text("x = 1\n" * 400_000)
    (repo / "logo.png").write_bytes(b"\x89PNG\r\n")
    docs = list(read_documents(repo))  # a folder with .git is a repository
    assert [d["path"] for d in docs] == ["README.md", "pkg/__init__.py", "pkg/core.py"]
    assert all(d["repo"] == "myrepo" and d["lang"] == "code" for d in docs)
    assert docs[2]["code_lang"] == "python" and docs[2]["text"].startswith("def run")
    assert [d["id"] for d in docs] == [d["id"] for d in read_code_repository(repo)]
    plain = tmp_path / "plain_src"
    plain.mkdir()
    (plain / "main.go").write_text("package main\n")
    assert [d["path"] for d in read_documents(f"code:{plain}")] == ["main.go"]


def test_hf_dataset_clear_error():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the tests have no network to reach the hub")
    with pytest.raises(ImportError, match="datasets"):
        list(read_documents("hf:owner/name:train"))


def test_split_inputs_byte_ranges(tmp_path):
    rows = [{"text": "x" * (i % 37) + f" row {i}"} for i in range(2000)]
    big = tmp_path / "big.jsonl"
    _write_jsonl(big, rows, {100: b"{oops\n", 1500: b'{"text": null}\n'})
    small = tmp_path / "small.jsonl.gz"
    small.write_bytes(gzip.compress(b'{"text": "tail"}\n'))
    whole_report = ReadReport()
    whole = list(read_documents([big, small], report=whole_report))
    for n in (1, 3, 8):
        parts = split_inputs([big, small], n, min_part_bytes=1000)
        assert len(parts) == n
        report = ReadReport()
        got = [d for shard in parts for p in shard for d in read_part(p, report=report)]
        assert got == whole  # same documents, same ids, same order
        assert [(e.line, e.kind) for e in report.errors] == [(101, "json"), (1501, "text_type")]
        if n > 1:
            assert sum(1 for shard in parts for p in shard if p.path == str(big)) == n
        merged = ReadReport()  # as a process pool would: one report per shard, merged
        for shard in parts:
            rep = ReadReport()
            for p in shard:
                list(read_part(p, report=rep))
            merged.merge(rep)
        assert merged.to_dict() == whole_report.to_dict()
    ranges = iter_jsonl_shards(big, 5)
    assert ranges[0].start == 0 and ranges[-1].end == big.stat().st_size
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    mid = InputPart(str(big), "jsonl", ranges[2].start, ranges[2].end)  # line counted itself
    assert list(read_part(mid)) == list(read_part(ranges[2]))


# -- token shards --------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_shards_round_trip(tmp_path, tok):
    docs = _corpus(150)
    docs.insert(5, {"id": "empty", "text": "", "source": "en"})
    manifest = write_token_shards(docs, tok, tmp_path / "out", shard_tokens=600,
                                  val_fraction=0.2, seed=3, batch_size=16)
    assert manifest["complete"] and manifest["empty_docs"] == 1
    assert manifest == read_manifest(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 512
    docs = [d for d in docs if d["text"]]
    expect = {d["id"]: tok.encode(d["text"], add_bos=True, add_eos=True, allow_special=False)
              for d in docs}
    val_ids = {d["id"] for d in docs if split_of(d["id"], 0.2, 3) == "val"}
    assert 10 < len(val_ids) < 60
    total_docs = total_tokens = 0
    for split in ("train", "val"):
        ts = TokenShards(tmp_path / "out", split)
        info = manifest["splits"][split]
        assert len(info["shards"]) > 1 and ts.num_docs == info["num_docs"]
        assert ts.num_tokens == info["num_tokens"] == sum(len(expect[ts.meta(i)["id"]])
                                                           for i in range(len(ts)))
        ids = [ts.meta(i)["id"] for i in range(len(ts))]
        assert ids == [d["id"] for d in docs if (d["id"] in val_ids) == (split == "val")]
        for i, arr in enumerate(ts):
            assert arr.dtype == np.uint32 and arr.tolist() == expect[ids[i]]
            assert ts.doc(i).tolist() == arr.tolist()
        per = Counter()
        for d in docs:
            if (d["id"] in val_ids) == (split == "val"):
                per[d["source"]] += len(expect[d["id"]])
        assert {g: v["num_tokens"] for g, v in info["per_source"].items()} == per
        total_docs += ts.num_docs
        total_tokens += ts.num_tokens
        # the raw format: a plain uint32 file and an int64 [start, length] index
        first = info["shards"][0]["name"]
        raw = np.memmap(tmp_path / "out" / f"{first}.bin", dtype=np.uint32, mode="r")
        idx = np.load(tmp_path / "out" / f"{first}.idx.npy")
        assert idx.dtype == np.int64 and idx.shape[1] == 2
        assert raw[idx[0, 0]:idx[0, 0] + idx[0, 1]].tolist() == expect[ids[0]]
        assert int(idx[-1].sum()) == raw.size
    assert total_docs == len(docs) and total_tokens == sum(map(len, expect.values()))
    # the split depends on the id only: another order gives the same validation documents
    write_token_shards(docs[::-1], tok, tmp_path / "rev", shard_tokens=600, val_fraction=0.2,
                       seed=3)
    rev = TokenShards(tmp_path / "rev", "validation")
    assert {rev.meta(i)["id"] for i in range(len(rev))} == val_ids


def test_shards_resume_after_crash(tmp_path, tok, monkeypatch):
    docs = _corpus(150)
    kwargs = {"shard_tokens": 500, "val_fraction": 0.1, "seed": 0, "batch_size": 8}
    write_token_shards(docs, tok, tmp_path / "clean", **kwargs)

    real_write = shards_mod._write_shard
    calls = []

    def crashing(out, name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real_write(out, name, *args)

    monkeypatch.setattr(shards_mod, "_write_shard", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_token_shards(docs, tok, tmp_path / "crash", **kwargs)
    partial = read_manifest(tmp_path / "crash")
    assert not partial["complete"] and len(partial["splits"]["train"]["shards"]) == 1
    with pytest.raises(ValueError, match="incomplete"):
        TokenShards(tmp_path / "crash")
    shutil.copytree(tmp_path / "crash", tmp_path / "partial")
    first_bin = (tmp_path / "crash" / f"{calls[0]}.bin")
    stamp = first_bin.stat().st_mtime_ns

    written = []
    monkeypatch.setattr(shards_mod, "_write_shard",
                        lambda out, name, *a: (written.append(name), real_write(out, name, *a)))
    write_token_shards(docs, tok, tmp_path / "crash", **kwargs)
    assert calls[0] not in written  # the finished shard was not rewritten
    assert first_bin.stat().st_mtime_ns == stamp
    assert _files(tmp_path / "crash") == _files(tmp_path / "clean")

    written.clear()
    write_token_shards(docs, tok, tmp_path / "crash", **kwargs)  # complete: nothing to do
    assert written == []
    with pytest.raises(ValueError, match="other parameters"):
        write_token_shards(docs, tok, tmp_path / "crash", **{**kwargs, "seed": 1})
    # resuming from a partial folder with a different input is refused
    with pytest.raises(ValueError, match="input differs"):
        write_token_shards(docs[1:] + docs[:1], tok, tmp_path / "partial", **kwargs)


def test_shards_process_pool(tmp_path, tok):
    docs = _corpus(60)
    write_token_shards(docs, tok, tmp_path / "one", shard_tokens=400, batch_size=8)
    write_token_shards(docs, tok, tmp_path / "pool", shard_tokens=400, batch_size=8,
                       num_workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "pool")


def test_shards_official_tokenizer(tmp_path):
    if not OFFICIAL.is_file():
        pytest.skip(f"official tokenizer not found at {OFFICIAL}")
    sp = load_tokenizer(OFFICIAL)
    docs = [{"id": str(i), "text": t} for i, t in enumerate(SAMPLE_TEXTS.values())]
    docs.append({"id": "x", "text": "literal <|im_end|> in web text"})
    write_token_shards(docs, OFFICIAL, tmp_path, val_fraction=0.0)
    ts = TokenShards(tmp_path)
    for i, d in enumerate(docs):
        assert ts.doc(i).tolist() == sp.encode(d["text"], add_bos=True, add_eos=True,
                                               allow_special=False)
    assert 92542 not in ts.doc(len(docs) - 1).tolist()  # no injected chat token


# -- packing ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("packed")
    write_token_shards(_corpus(120), tok, out, shard_tokens=700, val_fraction=0.0)
    return out


def _check_sample(ds: PackedDataset, i: int) -> None:
    s = ds[i]
    L = ds.seq_len
    ids, labels, doc_ids, pos = s["input_ids"], s["labels"], s["doc_ids"], s["position_ids"]
    pieces = ds.segments(i)
    n_real = sum(p[3] for p in pieces)
    for k, (src, d, a, n) in enumerate(pieces):
        start = sum(p[3] for p in pieces[:k])
        doc = ds.sources[src].doc(d)
        assert ids[start:start + n].tolist() == doc[a:a + n].tolist()
        assert (doc_ids[start:start + n] == k).all()
        assert pos[start:start + n].tolist() == list(range(n))  # restart per document piece
        for t in range(start, start + n):  # target: the next token of the same document
            nxt = a + (t - start) + 1
            assert labels[t] == (doc[nxt] if nxt < len(doc) else IGNORE_INDEX)
    if n_real < L:  # padding at the end of the epoch
        assert (ids[n_real:] == ds.pad_id).all() and (labels[n_real:] == IGNORE_INDEX).all()
        assert len(set(doc_ids[n_real:].tolist())) == 1 and doc_ids[n_real] == len(pieces)
    starts = [0] + [t for t in range(1, L) if doc_ids[t] != doc_ids[t - 1]]
    assert s["cu_seqlens"].tolist() == starts + [L]


def test_pack_no_token_lost(shard_dir):
    ts = TokenShards(shard_dir)
    L = 48
    assert ts.lengths.max() > 3 * L  # some documents are cut into several samples
    ds = pack(ts, L, seed=5)
    assert len(ds) == -(-ts.num_tokens // L)
    stream, targets = [], 0
    for i in range(len(ds)):
        _check_sample(ds, i)
        s = ds[i]
        n_real = sum(p[3] for p in ds.segments(i))
        stream += s["input_ids"][:n_real].tolist()
        targets += int((s["labels"] != IGNORE_INDEX).sum())
    order = ds.doc_order()
    assert sorted(d for _, d in order) == list(range(len(ts)))
    assert order != [(0, d) for d in range(len(ts))]  # shuffled
    assert stream == [t for _, d in order for t in ts.doc(d).tolist()]
    assert Counter(stream) == Counter(t for arr in ts for t in arr.tolist())
    assert targets == ts.num_tokens - len(ts)  # every token but each document's first
    # the same seed gives the same samples; another seed another order
    again = pack(ts, L, seed=5)
    assert all((again[i]["input_ids"] == ds[i]["input_ids"]).all() for i in range(len(ds)))
    assert pack(ts, L, seed=6).doc_order() != order
    assert len(pack(ts, L, seed=5, drop_last=True)) == ts.num_tokens // L


def test_pack_attention_stays_in_documents(shard_dir):
    from internlm2.config import ModelConfig
    from internlm2.model import build_model

    ts = TokenShards(shard_dir)
    ds = pack(ts, 64, seed=1)
    i = next(i for i in range(len(ds)) if len(ds.segments(i)) >= 3)
    model = build_model(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2), seed=0)
    batch = collate([ds[i], ds[i + 1]])
    with torch.no_grad():
        packed = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        via_cu = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
        torch.testing.assert_close(packed, via_cu)
        for b, k in ((0, i), (1, i + 1)):
            start = 0
            for _, _, _, n in ds.segments(k):
                alone = model(batch["input_ids"][b:b + 1, start:start + n])
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone,
                                           rtol=1e-4, atol=1e-5)
                start += n
        loss = torch.nn.functional.cross_entropy(packed.flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX)
    assert torch.isfinite(loss)
    assert batch["input_ids"].dtype == torch.long and batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"][-1] == 2 * 64


def test_pack_resume_from_position(shard_dir):
    ts = TokenShards(shard_dir)
    ds = PackedDataset(ts, 32, seed=2, loop=True)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = ds.state_dict()
    assert state["position"] == 7 and state["epoch"] == 0
    expect = [next(it)["input_ids"] for _ in range(5)]
    fresh = PackedDataset(ts, 32, seed=2, loop=True)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    got = [s["input_ids"] for _, s in zip(range(5), fresh)]
    assert all((a == b).all() for a, b in zip(expect, got))
    # across the end of an epoch: the next epoch is reshuffled, deterministically
    ds.load_state_dict({**state, "position": len(ds) - 1})
    it = iter(ds)
    next(it)
    first_new = next(it)
    assert ds.epoch == 1 and ds.position == 1
    other = PackedDataset(ts, 32, seed=2, epoch=1)
    assert (other[0]["input_ids"] == first_new["input_ids"]).all()
    assert other.doc_order() != PackedDataset(ts, 32, seed=2).doc_order()
    with pytest.raises(ValueError, match="seq_len"):
        fresh.load_state_dict({**state, "seq_len": 64})


def test_mixture_weights(tmp_path, tok):
    rng = np.random.default_rng(0)
    sources = {}
    for name, words, n in (("en", (5, 40), 50), ("zh", (1, 4), 30), ("code", (20, 120), 20)):
        if name == "zh":
            docs = [{"id": f"{name}{i}", "text": synthetic_chinese(int(rng.integers(*words)), i)}
                    for i in range(n)]
        else:
            docs = [{"id": f"{name}{i}", "text": _english(rng, int(rng.integers(*words)))}
                    for i in range(n)]
        write_token_shards(docs, tok, tmp_path / name, val_fraction=0.0)
        sources[name] = TokenShards(tmp_path / name)
    weights = {"en": 0.5, "zh": 0.3, "code": 0.2}
    mix = MixtureSampler({k: (sources[k], w) for k, w in weights.items()}, seed=0,
                         num_tokens=300_000)
    src, idx = mix.order(0)
    lengths = np.array([mix.sources[s].lengths[i] for s, i in zip(src, idx)])
    assert lengths.sum() >= 300_000 and lengths[:-1].sum() < 300_000
    for k, name in enumerate(mix.names):
        share = lengths[src == k].sum() / lengths.sum()
        assert abs(share - weights[name]) < 0.03, (name, share)
    again = MixtureSampler({k: (sources[k], w) for k, w in weights.items()}, seed=0,
                           num_tokens=300_000).order(0)
    assert (again[0] == src).all() and (again[1] == idx).all()
    by_docs = MixtureSampler({k: (sources[k], w) for k, w in weights.items()}, seed=0,
                             by="docs").order(0)[0]
    for k, name in enumerate(mix.names):
        assert abs((by_docs == k).mean() - weights[name]) < 0.06
    # packed samples from a mixture keep the same guarantees
    ds = PackedDataset(MixtureSampler({k: (sources[k], w) for k, w in weights.items()},
                                      seed=1, num_tokens=5000), 40)
    assert len(ds) == -(-ds.num_tokens // 40)
    for i in range(len(ds)):
        _check_sample(ds, i)
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler({"en": (sources["en"], -1.0)})
