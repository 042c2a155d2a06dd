"""Tokenized shards, and packing them into fixed-length samples with document boundaries kept.

On disk (`write_token_shards`), in one folder:

    manifest.json              what is there (below); rewritten atomically after every shard
    train-00000.bin            token ids, little-endian uint32, documents back to back
                               (np.memmap(path, dtype="<u4", mode="r"))
    train-00000.idx.npy        int64 [num_docs, 2]: (start, length) of each document, in tokens
                               from the start of the .bin
    train-00000.meta.jsonl     one JSON object per document, in index order: "id", "source"
                               and the other `meta_keys` the document has
    val-00000.bin / .idx.npy / .meta.jsonl   the validation split, same layout

manifest.json: {"format": "internlm2-token-shards", "version": 1, "dtype": "uint32",
"complete": bool, "tokenizer": {"class", "fingerprint", "vocab_size", "bos_id", "eos_id",
"pad_id"}, "params": {"shard_tokens", "val_fraction", "seed", "add_bos", "add_eos",
"allow_special", "group_key"}, "empty_docs": n, "splits": {"train"|"val": {"num_docs",
"num_tokens", "per_source": {group: {"num_docs", "num_tokens"}}, "shards": [{"name",
"num_docs", "num_tokens", "first_id", "last_id", "per_source": {group: {"num_docs",
"num_tokens"}}}]}}}. Totals per split are the sums over its shards.

A document goes to "val" when a hash of (seed, id) falls below `val_fraction`, so the split of
a document never depends on the rest of the corpus or on the order. A rerun after a crash
reads the input again, skips (without tokenizing) the documents of every shard the manifest
records, and writes the rest: finished shards are never rewritten, and the result is
byte-identical to an uninterrupted run.

Packing (`PackedDataset`): the documents (shuffled per epoch, or drawn by a `MixtureSampler`)
are concatenated into one stream that is cut every `seq_len` tokens; sample i holds stream
tokens [i*L, (i+1)*L) as `input_ids`, and its targets are the tokens one to the right (the
first token of sample i+1 is the target of the last position of sample i), so every token is
an input once and every token but the first of a document is a target once. A document that
crosses a cut is split and its remainder starts the next sample (report section 3.3: longer
documents are cut and the remainder is used too). Within a sample each document piece is its
own segment: `doc_ids` numbers the segments, `position_ids` restart at 0 in each one, and
`cu_seqlens` gives their boundaries, so attention never crosses documents. `labels` is -100
where the next token belongs to another document (the last token of a document is never
trained to predict the first token of an unrelated one) and on padding (only the last sample
of an epoch is padded, with `pad_id`, as its own segment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

FORMAT = "internlm2-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
SPLITS = ("train", "val")
IGNORE_INDEX = -100
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
_PROBE = "Hello world 123 4567.\n\t你好，世界！ <|im_end|> def f(x): return x**2"


# -- small helpers ------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb"):
    """Write to a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what defines a tokenizer's ids: its model file (SentencePiece), its
    tokenizer.json (BPE), or else its ids on a probe text; plus its special tokens."""
    fp = getattr(tokenizer, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    model_bytes = getattr(tokenizer, "_model_bytes", None)
    hf = getattr(tokenizer, "_tok", None)
    if isinstance(model_bytes, bytes):
        h.update(model_bytes)
    elif hf is not None and hasattr(hf, "to_str"):
        h.update(hf.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(tokenizer.encode(_PROBE, add_bos=True, add_eos=True)).encode())
    special = getattr(tokenizer, "special_tokens", {})
    h.update(json.dumps(sorted(special.items())).encode("utf-8"))
    h.update(str(tokenizer.vocab_size).encode())
    return h.hexdigest()


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """"train" or "val", from a hash of (seed, id): stable across runs, orders and machines."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{seed}\x1f{doc_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64 else "train"


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a token shard folder "
                                "(write one with write_token_shards)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{path}: format version {manifest['version']} is newer than this "
                         f"code ({VERSION})")
    return manifest


def _save_manifest(out: Path, manifest: dict) -> None:
    for split in manifest["splits"].values():  # totals always follow the shard list
        split["num_docs"] = sum(s["num_docs"] for s in split["shards"])
        split["num_tokens"] = sum(s["num_tokens"] for s in split["shards"])
        per: dict[str, dict[str, int]] = {}
        for s in split["shards"]:
            for g, c in s["per_source"].items():
                e = per.setdefault(g, {"num_docs": 0, "num_tokens": 0})
                e["num_docs"] += c["num_docs"]
                e["num_tokens"] += c["num_tokens"]
        split["per_source"] = dict(sorted(per.items()))
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with _atomic(out / MANIFEST) as f:
        f.write(data)


def _write_shard(out: Path, name: str, tokens: np.ndarray, index: np.ndarray,
                 metas: list[dict]) -> None:
    """The three files of one shard, each written atomically (the manifest comes after)."""
    with _atomic(out / f"{name}.bin") as f:
        np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tofile(f)
    with _atomic(out / f"{name}.idx.npy") as f:
        np.save(f, np.ascontiguousarray(index, dtype=np.int64))
    with _atomic(out / f"{name}.meta.jsonl") as f:
        f.write("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in metas).encode("utf-8"))


# -- tokenization (optionally in a process pool) ----------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_bytes: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = pickle.loads(tokenizer_bytes)


def _encode(tokenizer, texts: list[str], add_bos: bool, add_eos: bool,
            allow_special: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(texts, add_bos=add_bos, add_eos=add_eos,
                                 allow_special=allow_special)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts, add_bos, add_eos, allow_special):
    return _encode(_WORKER_TOKENIZER, texts, add_bos, add_eos, allow_special)


def _tokenized(batches: Iterator[list[dict]], tokenizer, add_bos: bool, add_eos: bool,
               allow_special: bool, num_workers: int):
    """(docs, flat ids, lengths) per batch, in input order."""
    if num_workers <= 1:
        for docs in batches:
            yield docs, *_encode(tokenizer, [d["text"] for d in docs], add_bos, add_eos,
                                 allow_special)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: forking a process that already ran a Rust tokenizer can deadlock
    with ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(pickle.dumps(tokenizer),)) as ex:
        pending: deque = deque()
        for docs in batches:
            pending.append((docs, ex.submit(_encode_in_worker, [d["text"] for d in docs],
                                            add_bos, add_eos, allow_special)))
            if len(pending) >= 2 * num_workers:  # bounded memory, workers kept busy
                d, fut = pending.popleft()
                yield d, *fut.result()
        while pending:
            d, fut = pending.popleft()
            yield d, *fut.result()


# -- writing ----------------------------------------------------------------------------------

class _Buffer:
    """Documents of one split waiting to become its next shard."""

    def __init__(self, split: str, next_index: int):
        self.split, self.next_index = split, next_index
        self.clear()

    def clear(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.metas: list[dict] = []
        self.per_source: dict[str, list[int]] = {}
        self.num_tokens = 0

    def add(self, ids: np.ndarray, meta: dict, group: str) -> None:
        self.chunks.append(ids)
        self.lengths.append(len(ids))
        self.metas.append(meta)
        e = self.per_source.setdefault(group, [0, 0])
        e[0] += 1
        e[1] += len(ids)
        self.num_tokens += len(ids)


def _check_ids(tokenizer, flat: np.ndarray) -> None:
    if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")


def write_token_shards(
    docs,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 1 << 26,
    val_fraction: float = 0.01,
    seed: int = 0,
    add_bos: bool = True,
    add_eos: bool = True,
    allow_special: bool = False,
    batch_size: int = 512,
    num_workers: int = 0,
    meta_keys: Sequence[str] = ("id", "source", "lang", "url", "path", "repo"),
    group_key: str = "source",
    text_key: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenize documents into shards of about `shard_tokens` tokens per split; return the
    manifest (see the module docstring for the files).

    docs: dicts with "id" and "text" (e.g. from `read_documents`), or inputs to read with it.
    tokenizer: a `internlm2.tokenizer.Tokenizer` or a path for `load_tokenizer`.
    allow_special=False (default) encodes special-token strings that occur in raw text as
    plain text, so web text cannot inject `<|im_end|>`. Documents with empty text are dropped
    (counted as `empty_docs`). Per-source counts use the `group_key` field. `num_workers` > 1
    tokenizes in a process pool. A rerun with the same input and parameters resumes: shards
    the manifest records are kept as they are; different parameters or tokenizer raise
    ValueError unless `overwrite=True` (which deletes the old shards first).
    """
    from internlm2.tokenizer import load_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(docs, (str, os.PathLike)) or (
            isinstance(docs, (list, tuple)) and docs and isinstance(docs[0], (str, os.PathLike))):
        from internlm2.data.readers import read_documents
        docs = read_documents(docs, text_key=text_key)
        text_key = "text"
    if shard_tokens < 1 or batch_size < 1:
        raise ValueError("shard_tokens and batch_size must be positive")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_info = {"class": type(tokenizer).__name__,
                "fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
                "eos_id": int(tokenizer.eos_id),
                "pad_id": int(getattr(tokenizer, "pad_id", tokenizer.eos_id))}
    if tok_info["vocab_size"] > 2 ** 32:
        raise ValueError("vocabulary too large for uint32 shards")
    params = {"shard_tokens": int(shard_tokens), "val_fraction": float(val_fraction),
              "seed": int(seed), "add_bos": bool(add_bos), "add_eos": bool(add_eos),
              "allow_special": bool(allow_special), "group_key": group_key}

    manifest = _start_manifest(out, tok_info, params, overwrite)
    if manifest["complete"]:
        return manifest
    splits = manifest["splits"]
    # Resume: documents of recorded shards are counted, checked at shard starts, not tokenized.
    done = {s: sum(e["num_docs"] for e in splits[s]["shards"]) for s in SPLITS}
    starts = {s: {} for s in SPLITS}  # split -> {doc number: expected first id}
    for s in SPLITS:
        n = 0
        for e in splits[s]["shards"]:
            starts[s][n] = e["first_id"]
            n += e["num_docs"]
    seen = dict.fromkeys(SPLITS, 0)
    buffers = {s: _Buffer(s, len(splits[s]["shards"])) for s in SPLITS}
    empty = 0

    def flush(buf: _Buffer) -> None:
        if not buf.lengths:
            return
        name = f"{buf.split}-{buf.next_index:05d}"
        lengths = np.asarray(buf.lengths, dtype=np.int64)
        index = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1)
        tokens = np.concatenate(buf.chunks).astype(TOKEN_DTYPE)
        _write_shard(out, name, tokens, index, buf.metas)
        splits[buf.split]["shards"].append({
            "name": name, "num_docs": len(buf.lengths), "num_tokens": int(buf.num_tokens),
            "first_id": buf.metas[0]["id"], "last_id": buf.metas[-1]["id"],
            "per_source": {g: {"num_docs": v[0], "num_tokens": v[1]}
                           for g, v in sorted(buf.per_source.items())}})
        _save_manifest(out, manifest)
        buf.next_index += 1
        buf.clear()

    def batches() -> Iterator[list[dict]]:
        nonlocal empty
        batch: list[dict] = []
        for n, doc in enumerate(docs):
            text = doc.get(text_key) if isinstance(doc, Mapping) else None
            if not isinstance(text, str):
                raise TypeError(f"document {n} has no string {text_key!r} field "
                                f"(id {doc.get('id') if isinstance(doc, Mapping) else doc!r})")
            if not text:
                empty += 1
                continue
            doc_id = doc.get("id")
            if doc_id in (None, ""):
                raise ValueError(f"document {n} has no id (read it with read_documents, or "
                                 "give every document an 'id')")
            doc_id = str(doc_id)
            split = split_of(doc_id, val_fraction, seed)
            k = seen[split]
            seen[split] += 1
            if k in starts[split] and starts[split][k] != doc_id:
                raise ValueError(
                    f"{out}: the input differs from the one the existing shards were written "
                    f"from ({split} document {k} is {doc_id!r}, the shards recorded "
                    f"{starts[split][k]!r}); use a new folder or overwrite=True")
            if k < done[split]:
                continue
            batch.append({"text": text, "_split": split, "_doc": doc})
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit="doc", desc="tokenize")
    for items, flat, lengths in _tokenized(batches(), tokenizer, add_bos, add_eos,
                                           allow_special, num_workers):
        _check_ids(tokenizer, flat)
        offsets = np.cumsum(lengths) - lengths
        for item, off, n in zip(items, offsets, lengths):
            doc = item["_doc"]
            meta = {k: doc[k] for k in meta_keys if k in doc}
            meta["id"] = str(doc["id"])
            group = doc.get(group_key)
            group = "unknown" if group is None else str(group)
            buf = buffers[item["_split"]]
            buf.add(flat[off:off + n], meta, group)
            if buf.num_tokens >= shard_tokens:
                flush(buf)
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    for s in SPLITS:
        flush(buffers[s])
    for s in SPLITS:
        if seen[s] < done[s]:
            raise ValueError(f"{out}: the input has fewer {s} documents ({seen[s]}) than the "
                             f"existing shards hold ({done[s]}); use a new folder or "
                             "overwrite=True")
    manifest["empty_docs"] = empty
    manifest["complete"] = True
    _save_manifest(out, manifest)
    return manifest


def _start_manifest(out: Path, tok_info: dict, params: dict, overwrite: bool) -> dict:
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        same = (old.get("tokenizer", {}).get("fingerprint") == tok_info["fingerprint"]
                and old.get("params") == params)
        if same and not overwrite:
            return old
        if not overwrite:
            raise ValueError(f"{out} holds shards written with other parameters or another "
                             "tokenizer; use a new folder or overwrite=True")
        for split in old.get("splits", {}).values():
            for e in split.get("shards", []):
                for ext in (".bin", ".idx.npy", ".meta.jsonl"):
                    (out / f"{e['name']}{ext}").unlink(missing_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "dtype": "uint32", "complete": False,
                "tokenizer": tok_info, "params": params, "empty_docs": 0,
                "splits": {s: {"num_docs": 0, "num_tokens": 0, "per_source": {}, "shards": []}
                           for s in SPLITS}}
    _save_manifest(out, manifest)
    return manifest


# -- reading ----------------------------------------------------------------------------------

class TokenShards:
    """The documents of one split of a shard folder, memory-mapped.

    `len(shards)` / `num_docs`, `num_tokens`, `doc(i)` (a read-only uint32 view),
    `lengths` (int64 per document), `meta(i)` (its metadata line), iteration over documents.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train",
                 allow_incomplete: bool = False):
        self.directory = Path(directory)
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = _SPLIT_ALIASES[split]
        self.manifest = read_manifest(self.directory)
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(f"{self.directory}: shards are incomplete (the writing run did not "
                             "finish); rerun write_token_shards to resume it")
        self.shards = [s for s in self.manifest["splits"][self.split]["shards"]
                       if s["num_docs"] > 0]
        self._index: list[np.ndarray] = []
        for s in self.shards:
            path = self.directory / f"{s['name']}.bin"
            size = path.stat().st_size if path.is_file() else -1
            if size != s["num_tokens"] * TOKEN_DTYPE.itemsize:
                raise ValueError(f"{path}: expected {s['num_tokens']} tokens "
                                 f"({s['num_tokens'] * 4} bytes), found {size} bytes")
            idx = np.load(self.directory / f"{s['name']}.idx.npy")
            if idx.shape != (s["num_docs"], 2):
                raise ValueError(f"{self.directory / s['name']}.idx.npy: shape {idx.shape}, "
                                 f"expected ({s['num_docs']}, 2)")
            self._index.append(idx)
        counts = np.array([s["num_docs"] for s in self.shards], dtype=np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(counts)])
        self.num_docs = int(self._first_doc[-1])
        self.lengths = (np.concatenate([i[:, 1] for i in self._index]) if self._index
                        else np.zeros(0, dtype=np.int64))
        self.num_tokens = int(self.lengths.sum())
        self._maps: dict[int, np.ndarray] = {}
        self._metas: dict[int, list[dict]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_id"])

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.directory)!r}, split={self.split!r}, "
                f"docs={self.num_docs}, tokens={self.num_tokens})")

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range ({self.num_docs} documents)")
        i %= max(self.num_docs, 1)
        k = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        return k, i - int(self._first_doc[k])

    def _tokens(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is None:
            m = np.memmap(self.directory / f"{self.shards[k]['name']}.bin", dtype=TOKEN_DTYPE,
                          mode="r")
            self._maps[k] = m
        return m

    def doc(self, i: int) -> np.ndarray:
        k, j = self._locate(int(i))
        start, length = self._index[k][j]
        return self._tokens(k)[start:start + length]

    __getitem__ = doc

    def doc_slice(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document i (without touching the rest of it)."""
        k, j = self._locate(int(i))
        s, length = self._index[k][j]
        stop = min(stop, int(length))
        return self._tokens(k)[s + start:s + stop]

    def meta(self, i: int) -> dict:
        k, j = self._locate(int(i))
        metas = self._metas.get(k)
        if metas is None:
            path = self.directory / f"{self.shards[k]['name']}.meta.jsonl"
            with open(path, encoding="utf-8") as f:
                metas = [json.loads(line) for line in f]
            self._metas[k] = metas
        return metas[j]

    def __iter__(self) -> Iterator[np.ndarray]:
        for k, idx in enumerate(self._index):
            toks = self._tokens(k)
            for start, length in idx:
                yield toks[start:start + length]


# -- document orders: shuffled shards and mixtures -------------------------------------------

def _as_sources(source) -> list[TokenShards]:
    if isinstance(source, TokenShards):
        return [source]
    if isinstance(source, (list, tuple)) and source and \
            all(isinstance(s, TokenShards) for s in source):
        return list(source)
    raise TypeError("expected TokenShards, a list of them, or a MixtureSampler")


def _concat_order(sources: list[TokenShards], seed: int, epoch: int,
                  shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every document of every source once, in a seeded random order (or in order)."""
    src = np.concatenate([np.full(len(s), k, dtype=np.int32) for k, s in enumerate(sources)])
    idx = np.concatenate([np.arange(len(s), dtype=np.int64) for s in sources])
    if shuffle and len(src):
        perm = np.random.default_rng([seed, epoch]).permutation(len(src))
        src, idx = src[perm], idx[perm]
    return src, idx


class MixtureSampler:
    """Documents drawn from several sources with given weights, e.g.
    `MixtureSampler({"en": (en, 0.5), "zh": (zh, 0.3), "code": (code, 0.2)}, seed=0)`.

    by="tokens" (default): the weights are shares of tokens (a source is drawn with
    probability proportional to weight / mean document length); by="docs": shares of
    documents. Within a source documents come in a seeded random order; a source that runs
    out starts a new pass in a new order (upsampling), one that is not used up is
    subsampled. An epoch (`order(epoch)`) holds `num_tokens` tokens (default: all sources'
    tokens together) and is deterministic given the seed and the epoch.
    """

    def __init__(self, sources: Mapping[str, tuple[TokenShards, float]], seed: int = 0, *,
                 num_tokens: int | None = None, by: str = "tokens"):
        if by not in ("tokens", "docs"):
            raise ValueError(f"by must be 'tokens' or 'docs', got {by!r}")
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = list(sources)
        self.sources = [sources[n][0] for n in self.names]
        w = np.array([float(sources[n][1]) for n in self.names])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
        for name, s, wi in zip(self.names, self.sources, w):
            if wi > 0 and s.num_tokens == 0:
                raise ValueError(f"mixture source {name!r} has weight {wi} but no documents")
        self.weights = w / w.sum()
        self.seed, self.by = seed, by
        self.num_tokens = int(sum(s.num_tokens for s in self.sources) if num_tokens is None
                              else num_tokens)
        mean = np.array([s.num_tokens / max(len(s), 1) for s in self.sources])
        p = self.weights / np.where(mean > 0, mean, 1) if by == "tokens" else self.weights.copy()
        self.probs = p / p.sum()

    def order(self, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(source index, document index) of each document of the epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        passes = [0] * len(self.sources)
        queues: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in self.sources]

        def take(k: int, n: int) -> np.ndarray:
            while len(queues[k]) < n:
                perm = np.random.default_rng([self.seed, epoch, k, passes[k]]).permutation(
                    len(self.sources[k]))
                passes[k] += 1
                queues[k] = np.concatenate([queues[k], perm])
            out, queues[k] = queues[k][:n], queues[k][n:]
            return out

        srcs, idxs = [], []
        total = 0
        mean = sum(p * s.num_tokens / max(len(s), 1) for p, s in zip(self.probs, self.sources))
        while total < self.num_tokens:
            block = min(1 << 20, max(64, int((self.num_tokens - total) / max(mean, 1)) + 16))
            src = rng.choice(len(self.sources), size=block, p=self.probs).astype(np.int32)
            idx = np.empty(block, dtype=np.int64)
            lengths = np.empty(block, dtype=np.int64)
            for k in range(len(self.sources)):
                sel = np.flatnonzero(src == k)
                if len(sel):
                    idx[sel] = take(k, len(sel))
                    lengths[sel] = self.sources[k].lengths[idx[sel]]
            cum = total + np.cumsum(lengths)
            stop = int(np.searchsorted(cum, self.num_tokens, side="left")) + 1
            srcs.append(src[:stop])
            idxs.append(idx[:stop])
            total = int(cum[min(stop, block) - 1])
        return np.concatenate(srcs), np.concatenate(idxs)


# -- packing ----------------------------------------------------------------------------------

class PackedDataset:
    """Fixed-length samples of `seq_len` tokens packed from documents (module docstring).

    `ds[i]` -> {"input_ids", "labels", "doc_ids", "position_ids": int64 [seq_len],
    "cu_seqlens": int32 [segments + 1]} for the current epoch; `len(ds)` samples per epoch.
    Iterating yields from `position` on (and on through later epochs when `loop=True`),
    advancing `position` / `epoch`; `state_dict()` / `load_state_dict()` resume exactly.
    Works as a map-style torch Dataset with `collate_fn=collate`.
    """

    def __init__(self, source, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 pad_id: int | None = None, drop_last: bool = False, loop: bool = False,
                 epoch: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.mixture = source if isinstance(source, MixtureSampler) else None
        self.sources = self.mixture.sources if self.mixture else _as_sources(source)
        self.seq_len, self.seed, self.shuffle = int(seq_len), int(seed), shuffle
        self.drop_last, self.loop = drop_last, loop
        self.pad_id = int(self.sources[0].pad_id if pad_id is None else pad_id)
        self.position = 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Build the document order of `epoch` (and start it from its first sample)."""
        self.epoch = int(epoch)
        self.position = 0
        if self.mixture is not None:
            self._src, self._idx = self.mixture.order(self.epoch)
        else:
            self._src, self._idx = _concat_order(self.sources, self.seed, self.epoch,
                                                 self.shuffle)
        lengths = np.zeros(len(self._src), dtype=np.int64)
        for k, s in enumerate(self.sources):
            sel = self._src == k
            lengths[sel] = s.lengths[self._idx[sel]]
        self._lengths = lengths
        self._ends = np.cumsum(lengths)
        self.num_tokens = int(self._ends[-1]) if len(lengths) else 0
        n = self.num_tokens // self.seq_len if self.drop_last else \
            -(-self.num_tokens // self.seq_len)
        self._len = int(n)

    def __len__(self) -> int:
        return self._len

    def doc_order(self) -> list[tuple[int, int]]:
        """(source index, document index) of the epoch's documents in stream order."""
        return list(zip(self._src.tolist(), self._idx.tolist()))

    def segments(self, i: int, extra: int = 0) -> list[tuple[int, int, int, int]]:
        """(source, document, start, length) of the document pieces in stream tokens
        [i*L, (i+1)*L + extra) (the pieces sample i is made of when extra = 0)."""
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range ({self._len} samples)")
        start = i * self.seq_len
        end = min(start + self.seq_len + extra, self.num_tokens)
        j = int(np.searchsorted(self._ends, start, side="right"))
        out = []
        while j < len(self._ends) and start < end:
            doc_start = int(self._ends[j] - self._lengths[j])
            a, b = start - doc_start, min(end, int(self._ends[j])) - doc_start
            if b > a:
                out.append((int(self._src[j]), int(self._idx[j]), a, b - a))
            start = doc_start + b
            j += 1
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            i += self._len
        L = self.seq_len
        pieces = self.segments(i, extra=1)  # one token more: the last position's target
        tokens = np.full(L + 1, self.pad_id, dtype=np.int64)
        seg = np.full(L + 1, -1, dtype=np.int64)
        pos = 0
        for n, (s, d, a, length) in enumerate(pieces):
            tokens[pos:pos + length] = self.sources[s].doc_slice(d, a, a + length)
            seg[pos:pos + length] = n
            pos += length
        # tokens[:pos] are real; tokens[L] (when real) only serves as the last target
        real = min(pos, L)
        if real < L:  # the end of the epoch: padding is a segment of its own
            seg[real:L] = seg[real - 1] + 1
        same = (np.arange(1, L + 1) < pos) & (seg[1:] == seg[:-1])
        labels = np.where(same, tokens[1:], IGNORE_INDEX)
        doc_ids = seg[:L].copy()
        starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
        position_ids = np.arange(L) - np.repeat(starts, np.diff(np.r_[starts, L]))
        cu = np.r_[starts, L].astype(np.int32)
        return {"input_ids": tokens[:L], "labels": labels, "doc_ids": doc_ids,
                "position_ids": position_ids, "cu_seqlens": cu}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            while self.position < self._len:
                i = self.position
                self.position += 1  # consumed once handed out
                yield self[i]
            if not self.loop:
                return
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "num_samples": self._len}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["seq_len"]) != self.seq_len or int(state["seed"]) != self.seed:
            raise ValueError(f"state is for seq_len={state['seq_len']}, seed={state['seed']}; "
                             f"this dataset has seq_len={self.seq_len}, seed={self.seed}")
        if int(state["epoch"]) != self.epoch:
            self.set_epoch(int(state["epoch"]))
        if "num_samples" in state and int(state["num_samples"]) != self._len:
            raise ValueError(f"state is for {state['num_samples']} samples per epoch, this "
                             f"dataset has {self._len}: the data changed")
        self.position = int(state["position"])


def pack(shards, seq_len: int, *, seed: int = 0, shuffle: bool = True,
         pad_id: int | None = None, drop_last: bool = False) -> PackedDataset:
    """`PackedDataset(shards, seq_len, ...)`: shards are TokenShards, a list of them, a
    MixtureSampler, or a shard folder (its train split)."""
    if isinstance(shards, (str, os.PathLike)):
        shards = TokenShards(shards)
    return PackedDataset(shards, seq_len, seed=seed, shuffle=shuffle, pad_id=pad_id,
                         drop_last=drop_last)


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Stack samples into torch tensors: input_ids, labels, doc_ids, position_ids [B, L]
    (int64) and cu_seqlens (int32, over the flattened batch, as flash-attn's varlen takes).
    Use `model(batch["input_ids"], doc_ids=batch["doc_ids"])` (or `cu_seqlens=`) and
    cross entropy with ignore_index=-100 on `labels`."""
    import torch

    if not samples:
        raise ValueError("collate needs at least one sample")
    out = {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples])).long()
           for k in ("input_ids", "labels", "doc_ids", "position_ids")}
    L = out["input_ids"].shape[1]
    cu = [np.asarray(samples[0]["cu_seqlens"][:1], dtype=np.int64)]
    for b, s in enumerate(samples):
        cu.append(np.asarray(s["cu_seqlens"][1:], dtype=np.int64) + b * L)
    out["cu_seqlens"] = torch.from_numpy(np.concatenate(cu).astype(np.int32))
    return out


def iter_batches(dataset: PackedDataset, batch_size: int) -> Iterator[dict]:
    """Collated batches from `dataset.position` on (resumable through its state)."""
    batch = []
    for sample in dataset:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


__all__ = [
    "IGNORE_INDEX",
    "TOKEN_DTYPE",
    "MixtureSampler",
    "PackedDataset",
    "TokenShards",
    "collate",
    "iter_batches",
    "pack",
    "read_manifest",
    "split_of",
    "tokenizer_fingerprint",
    "write_token_shards",
]
