"""Deduplication (report 3.1): exact copies first, then MinHash near copies at Jaccard >= 0.7.

Shingles. Text is lower-cased and cut into tokens: every CJK / kana / hangul / Thai-family
character is a token of its own, and every maximal run of other letters, digits and combining
marks is a token; whitespace, punctuation and symbols only separate. Shingles are the
`ngram`-grams (default 5) of that token stream, so an English document is shingled by word
5-grams, a Chinese one by character 5-grams, and a mixed one by both. The rule is per token,
not per document: two copies of one text shingle alike whatever their `lang` field says (a
per-document switch would give a near copy tagged differently a different shingle set), so
`lang` arguments are accepted and ignored. Code needs no special case: indentation is
whitespace, so 2 spaces, 4 spaces and tabs shingle the same. A document with fewer than
`ngram` tokens is one shingle; one with no token has an empty set and is left to exact dedup.

Hashing, all numpy and vectorised over a batch of documents (no per-token Python): a token's
hash is the polynomial sum(c_j * P^(e-j)) mod 2^64 of its code points, read off prefix sums of
c_j * P^-j and finished by the splitmix64 mixer; an n-gram's key is the sum of its token hashes
times distinct random odd constants, mixed again, top 32 bits kept. Because the keys are already
uniformly mixed, the `num_perm` hash functions can be plain affine maps h_i(x) = a_i*x + b_i
mod 2^32 (a_i odd, so each is a permutation of the 32-bit keys), computed with wrap-around
uint32 arithmetic (8 lanes per AVX2 instruction, no modulo); over mixed keys they behave as
independent random permutations (estimates are unbiased with binomial variance, checked in the
tests), at twice the speed of (a*x + b) mod (2^61 - 1) in uint64. Signatures are uint32
[N, num_perm]; a document with no token gets all 0xFFFFFFFF and never enters LSH. Everything
follows from `seed`, so the same text has the same signature in every process.

Exact copies first: a 64-bit blake2b of the text lower-cased, whitespace runs collapsed to one
space and stripped; each group keeps its newest member (largest `(dump, date)` strings, else the
first seen), the rest are removed as "exact duplicate of <kept id>".

Near copies: LSH banding with b bands of r rows (b*r <= num_perm) minimising the weighted areas
of false positives below the threshold and false negatives above it, as datasketch chooses them
(`optimal_bands`; its equal weights give 14 x 9 for 0.7 and 128). Every candidate pair is
verified with the Jaccard estimated from the whole signature (>= threshold), so a false
positive costs one signature comparison and precision stays high; the dedup therefore weights
false negatives 0.9 and false positives 0.1, giving 20 x 6 (a pair at Jaccard 0.75 becomes a
candidate with probability 0.98 instead of 0.67). Confirmed pairs are clustered by union-find;
each cluster keeps its newest document, else the first seen, and every other member is removed
with `reason` "near-duplicate of <kept id> (jaccard~0.83)" (the estimate against the kept one).

Scale: documents are analysed in shards by a process pool (fork: the texts are not pickled).
With a `workdir` (always, in `dedup_files`), each shard's signatures (.npy) and (band hash, row)
records, sorted by hash, are spilled to disk; bands are then processed one hash-range partition
at a time through memory maps, so peak memory is one partition (`partition_bytes`) plus about
40 bytes per document (exact hash, recency rank, decisions), not the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

U64 = np.uint64
_C1, _C2 = U64(0xBF58476D1CE4E5B9), U64(0x94D049BB133111EB)
_P = U64(0x100000001B3 * 2 + 1)  # odd base of the per-token polynomial
_SIG_EMPTY = np.uint32(0xFFFFFFFF)
# CJK ideographs, kana, hangul, bopomofo, and scripts written without spaces: one token per char
_CHAR_TOKEN_RANGES = [(0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1100, 0x11FF), (0x1780, 0x17FF),
                      (0x2E80, 0x2FDF), (0x3040, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
                      (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x323AF)]


# ----------------------------------------------------------------------------- tokens

@functools.cache
def _char_classes() -> np.ndarray:
    """Code point -> 0 punctuation/symbol, 1 word character, 2 single-character token,
    3 whitespace (as str.split sees it)."""
    n = 0x30000  # above this only CJK extensions are assigned letters we care about
    table = np.zeros(0x110000, np.uint8)
    table[:n] = np.fromiter((1 if ch.isalnum() or unicodedata.category(ch)[0] == "M" else
                             3 if ch.isspace() else 0 for ch in map(chr, range(n))), np.uint8, n)
    for lo, hi in _CHAR_TOKEN_RANGES:
        part = table[lo:hi + 1]
        part[(part == 1) | (hi > 0x1FFFF)] = 2  # unassigned gaps stay separators
    return table


@functools.cache
def _token_regex() -> re.Pattern:
    """The same tokens as the vectorised path, for the exact reference (`tokens`)."""
    table = _char_classes()

    def char_set(mask: np.ndarray) -> str:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        return "".join(f"\\U{lo:08x}-\\U{hi - 1:08x}" for lo, hi in zip(edges[::2], edges[1::2]))

    return re.compile(f"[{char_set(table == 2)}]|[{char_set(table == 1)}]+")


def tokens(text: str) -> list[str]:
    """Tokens of `text` (see the module docstring); pure Python, the reference for tests."""
    return _token_regex().findall(text.lower())


def shingles(text: str, ngram: int = 5) -> set[str]:
    """The exact shingle set: `ngram`-grams of tokens joined by a space."""
    toks = tokens(text)
    if 0 < len(toks) < ngram:
        return {" ".join(toks)}
    return {" ".join(toks[k:k + ngram]) for k in range(len(toks) - ngram + 1)}


def jaccard(a: str, b: str, lang: str | None = None, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (`lang` ignored, see module doc)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place."""
    z ^= z >> U64(30)
    z *= _C1
    z ^= z >> U64(27)
    z *= _C2
    z ^= z >> U64(31)
    return z


_POWERS: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P^j, P^-j) mod 2^64 for j < n, cached per process and grown by doubling."""
    if len(_POWERS.get("pos", ())) < n:
        size = max(n, 2 * len(_POWERS.get("pos", ())), 1 << 16)
        inv = U64(pow(int(_P), -1, 1 << 64))
        for key, base in (("pos", _P), ("neg", inv)):
            arr = np.full(size, base, U64)
            arr[0] = 1
            _POWERS[key] = np.cumprod(arr, dtype=U64)  # wraps mod 2^64, as intended
    return _POWERS["pos"], _POWERS["neg"]


# ----------------------------------------------------------------------------- MinHash

class MinHasher:
    """MinHash signatures: `num_perm` multiply-add-shift hashes over `ngram` shingles.

    `signatures(texts)` is vectorised over the whole batch; signatures are uint32
    [N, num_perm]; a text with no token gets all 0xFFFFFFFF (`empty` tells them apart)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        rng = np.random.default_rng([seed, 0x6D696E68])
        self.a = rng.integers(0, 2**32, num_perm, dtype=U64).astype(np.uint32) | np.uint32(1)
        self.b = rng.integers(0, 2**32, num_perm, dtype=U64).astype(np.uint32)
        self.gram_mult = rng.integers(0, 2**64, ngram, dtype=U64) | U64(1)
        self.band_mult = rng.integers(0, 2**64, num_perm, dtype=U64) | U64(1)

    def signature(self, text: str, lang: str | None = None) -> np.ndarray:
        return self.analyse([text])["sig"][0]

    def signatures(self, texts: Sequence[str], langs: Sequence[str] | None = None,
                   max_chars: int = 1 << 19) -> np.ndarray:
        return self.analyse(texts, max_chars)["sig"]

    def analyse(self, texts: Sequence[str], max_chars: int = 1 << 19) -> dict:
        """{"sig": uint32 [N, num_perm], "empty": no token, "exact": uint64 exact-copy hash}."""
        out = {"sig": np.empty((len(texts), self.num_perm), np.uint32),
               "empty": np.zeros(len(texts), bool), "exact": np.zeros(len(texts), U64)}
        for lo, hi in _batches([len(t) for t in texts], max_chars):
            x, doc, ntok, exact = self._keys(texts[lo:hi])
            out["sig"][lo:hi] = self._minhash(x, doc, hi - lo)
            out["empty"][lo:hi], out["exact"][lo:hi] = ntok == 0, exact
        return out

    def _keys(self, texts: Sequence[str]) -> tuple[np.ndarray, ...]:
        """(32-bit shingle keys, their document (sorted), tokens per document, exact hashes)."""
        cp, starts, lens = _code_points(texts)
        cls = _char_classes()[cp]
        word, single = cls == 1, cls == 2
        edge = np.empty_like(word)
        edge[0], edge[1:] = word[0], word[1:] & ~word[:-1]
        tok_start = np.flatnonzero(edge | single)
        edge[-1], edge[:-1] = word[-1], word[:-1] & ~word[1:]
        tok_end = np.flatnonzero(edge | single)
        pos, neg = _powers(len(cp))
        prefix = np.empty(len(cp) + 1, U64)
        prefix[0] = 0
        np.cumsum(np.multiply(cp, neg[:len(cp)], dtype=U64), out=prefix[1:])
        th = _mix64((prefix[tok_end + 1] - prefix[tok_start]) * pos[tok_end])
        tdoc = np.searchsorted(starts, tok_start, "right") - 1
        ntok = np.bincount(tdoc, minlength=len(texts))
        n, m = self.ngram, len(th)
        if m >= n:
            g = th[:m - n + 1] * self.gram_mult[0]
            for k in range(1, n):
                g += th[k:m - n + 1 + k] * self.gram_mult[k]
            inside = tdoc[:m - n + 1] == tdoc[n - 1:]
            keys, kdoc = g[inside], tdoc[:m - n + 1][inside]
        else:
            keys, kdoc = np.empty(0, U64), np.empty(0, np.int64)
        short = np.flatnonzero((ntok > 0) & (ntok < n))
        if len(short):  # short documents: one shingle of all their tokens
            first = (np.cumsum(ntok) - ntok)[short]
            g = np.zeros(len(short), U64)
            for k in range(n - 1):
                have = ntok[short] > k
                g[have] += th[first[have] + k] * self.gram_mult[k]
            keys, kdoc = np.concatenate([keys, g]), np.concatenate([kdoc, short])
            order = np.argsort(kdoc, kind="stable")
            keys, kdoc = keys[order], kdoc[order]
        keys = (_mix64(keys) >> U64(32)).astype(np.uint32)
        return keys, kdoc, ntok, _exact_hashes(cp, cls == 3, starts, lens)

    def _minhash(self, x: np.ndarray, doc: np.ndarray, ndocs: int, block: int = 8192
                 ) -> np.ndarray:
        out = np.full((self.num_perm, ndocs), _SIG_EMPTY, np.uint32)
        if len(x):
            a, b = self.a[:, None], self.b[:, None]
            buf = np.empty((self.num_perm, block), np.uint32)
            change = np.flatnonzero(doc[1:] != doc[:-1]) + 1
            parts, part_docs = [], []
            for lo in range(0, len(x), block):
                hi = min(lo + block, len(x))
                h = buf[:, :hi - lo]
                np.multiply(a, x[None, lo:hi], out=h)  # wraps mod 2^32, 8 lanes per AVX2 op
                h += b
                cuts = change[np.searchsorted(change, lo, "right"):np.searchsorted(change, hi)]
                rel = np.concatenate([[0], cuts - lo])
                parts.append(np.minimum.reduceat(h, rel, axis=1))
                part_docs.append(doc[lo + rel])
            mins, mdoc = np.concatenate(parts, axis=1), np.concatenate(part_docs)
            cuts = np.concatenate([[0], np.flatnonzero(mdoc[1:] != mdoc[:-1]) + 1])
            out[:, mdoc[cuts]] = np.minimum.reduceat(mins, cuts, axis=1)
        return np.ascontiguousarray(out.T)


def _code_points(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower-cased texts joined by spaces as code points (uint8 when all ASCII, else uint32),
    each text's start and length."""
    low = [t.lower() for t in texts]
    lens = np.fromiter(map(len, low), np.int64, len(low))
    starts = np.cumsum(lens + 1) - lens - 1  # the joining space keeps tokens inside documents
    joined = " ".join(low)
    if joined.isascii():
        return np.frombuffer(joined.encode("ascii"), np.uint8), starts, lens
    return np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32), starts, lens


def _exact_hashes(cp: np.ndarray, ws: np.ndarray, starts: np.ndarray, lens: np.ndarray
                  ) -> np.ndarray:
    """64-bit blake2b of each text lower-cased with whitespace runs collapsed to one space and
    stripped; hashed as latin-1 bytes when every code point is < 256, else as UTF-32-LE."""
    keep = ~ws
    keep[1:] |= ws[1:] & ~ws[:-1]
    keep[0] = True
    z = np.where(ws, 32, cp).astype(cp.dtype)[keep]
    before = np.empty(len(keep) + 1, np.int64)
    before[0] = 0
    np.cumsum(keep, dtype=np.int64, out=before[1:])
    lo, hi = before[starts], before[starts + lens]
    lo += (lo < hi) & (z[np.minimum(lo, len(z) - 1)] == 32)
    hi -= (lo < hi) & (z[np.maximum(hi - 1, 0)] == 32)
    wide = np.zeros(len(lo), bool)
    if z.dtype != np.uint8:
        nonempty = np.flatnonzero(hi > lo)  # between documents lie only spaces (< 256)
        if len(nonempty):
            wide[nonempty] = np.maximum.reduceat(z, lo[nonempty]) >= 256
    narrow = memoryview(z if z.dtype == np.uint8 else z.astype(np.uint8))
    full = memoryview(z.view(np.uint8))
    blake, size = hashlib.blake2b, z.itemsize
    digests = [blake(full[size * a:size * b] if w else narrow[a:b], digest_size=8).digest()
               for a, b, w in zip(lo.tolist(), hi.tolist(), wide.tolist())]
    return np.frombuffer(b"".join(digests), "<u8").astype(U64)


def _batches(lengths: Sequence[int], max_chars: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) index ranges of at most ~max_chars characters each."""
    out, lo, size = [], 0, 0
    for i, n in enumerate(lengths):
        if size and size + n > max_chars:
            out.append((lo, i))
            lo, size = i, 0
        size += n + 1
    if lo < len(lengths):
        out.append((lo, len(lengths)))
    return out


# ----------------------------------------------------------------------------- banding

@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)
                  ) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted area of false
    positives (Jaccard below `threshold` becoming candidates) and false negatives (above it
    missed), as datasketch's MinHashLSH chooses them."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = pairs[:, :1].astype(float), pairs[:, 1:].astype(float)
    s_lo, s_hi = np.linspace(0.0, threshold, 512), np.linspace(threshold, 1.0, 512)
    fp = np.trapezoid(1 - (1 - s_lo ** r) ** b, s_lo, axis=1)
    fn = np.trapezoid((1 - s_hi ** r) ** b, s_hi, axis=1)
    best = pairs[int(np.argmin(weights[0] * fp + weights[1] * fn))]
    return int(best[0]), int(best[1])


def _band_records(hasher: MinHasher, sigs: np.ndarray, skip: np.ndarray, b: int, r: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(band hash, row) of every band of every non-skipped row, sorted by hash."""
    rows = np.flatnonzero(~skip)
    mult = hasher.band_mult[:b * r].reshape(b, r)
    h = (sigs[rows, :b * r].reshape(len(rows), b, r).astype(U64) * mult).sum(axis=2, dtype=U64)
    h = _mix64((h + np.arange(b, dtype=U64) * _C1).ravel())  # band index salted in
    rows = np.repeat(rows.astype(np.uint32), b)
    order = np.argsort(h, kind="stable")
    return h[order], rows[order]


def _bucket_pairs(h: np.ndarray, d: np.ndarray, sim: Callable, threshold: float,
                  max_rounds: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Confirmed pairs (u, v, estimated Jaccard) from band records (hash h, doc d).

    Each bucket is checked as a star around its first document; members that fail become the
    next round's bucket (up to `max_rounds`), so a stray collision cannot hide true pairs."""
    none = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), 0)
    if len(h) < 2:
        return none
    order = np.lexsort((d, h))
    h, d = h[order], d[order]
    keep = np.zeros(len(h), bool)
    same = h[1:] == h[:-1]
    keep[1:] |= same
    keep[:-1] |= same
    gid = np.cumsum(np.concatenate([[True], ~same]))[keep]
    d = d[keep]
    us, vs, ss, checked = [], [], [], 0
    for _ in range(max_rounds):
        if len(d) < 2:
            break
        first = np.concatenate([[True], gid[1:] != gid[:-1]])
        pivot = np.maximum.accumulate(np.where(first, np.arange(len(d)), 0))
        cand = np.flatnonzero(~first)
        u, v = d[pivot[cand]], d[cand]
        s = sim(u, v)
        checked += len(u)
        ok = (s >= threshold) & (u != v)
        us.append(u[ok]), vs.append(v[ok]), ss.append(s[ok])
        rest = cand[~ok & (u != v)]
        d, gid = d[rest], gid[rest]
        multi = np.zeros(len(d), bool)
        multi[1:] |= gid[1:] == gid[:-1]
        multi[:-1] |= gid[1:] == gid[:-1]
        d, gid = d[multi], gid[multi]
    if not us:
        return none
    return np.concatenate(us), np.concatenate(vs), np.concatenate(ss).astype(np.float32), checked


def _components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over edges, vectorised (hook larger root to smaller, then path-halve).
    Returns (nodes, root position of each node)."""
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    a, b = inv[:len(u)], inv[len(u):]
    parent = np.arange(len(nodes))
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            return nodes, parent
        np.minimum.at(parent, np.maximum(pa[diff], pb[diff]), np.minimum(pa[diff], pb[diff]))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


# ----------------------------------------------------------------------------- stores

class _MemStore:
    """Shard outputs held in memory (the small-input path)."""

    def __init__(self, shards: list[dict]):
        self.sizes = [len(s["exact"]) for s in shards]
        self.starts = np.cumsum([0] + self.sizes)
        self.sig = np.concatenate([s["sig"] for s in shards]) if shards else np.empty((0, 0))
        self.exact = np.concatenate([s["exact"] for s in shards]) if shards else np.empty(0, U64)
        self.empty = np.concatenate([s["empty"] for s in shards]) if shards else np.empty(0, bool)
        self.band_h = [s["band_h"] for s in shards]
        self.band_row = [s["band_row"] for s in shards]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.sig[idx]

    def band_slice(self, k: int, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray]:
        h = self.band_h[k]
        i = np.searchsorted(h, U64(lo))
        j = len(h) if hi is None else np.searchsorted(h, U64(hi))
        return h[i:j], self.band_row[k][i:j]


class _DiskStore(_MemStore):
    """Shard outputs spilled under `root` (sig_K.npy, band_h_K.npy, band_row_K.npy, meta_K.npz),
    read back through memory maps."""

    def __init__(self, root: Path, nshards: int):
        self.root = root
        metas = [np.load(root / f"meta_{k:05d}.npz") for k in range(nshards)]
        self.sizes = [len(m["exact"]) for m in metas]
        self.starts = np.cumsum([0] + self.sizes)
        self.exact = np.concatenate([m["exact"] for m in metas] or [np.empty(0, U64)])
        self.empty = np.concatenate([m["empty"] for m in metas] or [np.empty(0, bool)])
        self.sigs = [np.load(root / f"sig_{k:05d}.npy", mmap_mode="r") for k in range(nshards)]
        self.band_h = [np.load(root / f"band_h_{k:05d}.npy", mmap_mode="r") for k in range(nshards)]
        self.band_row = [np.load(root / f"band_row_{k:05d}.npy", mmap_mode="r")
                         for k in range(nshards)]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, idx, "right") - 1
        out = np.empty((len(idx), self.sigs[0].shape[1] if self.sigs else 0), np.uint32)
        for k in np.unique(shard):
            sel = shard == k
            local = idx[sel] - self.starts[k]
            order = np.argsort(local)  # sorted reads are kind to the page cache
            rows = np.empty((len(local), out.shape[1]), np.uint32)
            rows[order] = self.sigs[k][local[order]]
            out[sel] = rows
        return out


def _similarity(store: _MemStore, u: np.ndarray, v: np.ndarray, batch: int = 1 << 15
                ) -> np.ndarray:
    out = np.empty(len(u), np.float32)
    for lo in range(0, len(u), batch):
        a, b = store.rows(u[lo:lo + batch]), store.rows(v[lo:lo + batch])
        out[lo:lo + batch] = (a == b).mean(axis=1)
    return out


# ----------------------------------------------------------------------------- shard work

def _compute_shard(hasher: MinHasher, texts: Sequence[str], b: int, r: int) -> dict:
    shard = hasher.analyse(texts)
    shard["band_h"], shard["band_row"] = _band_records(hasher, shard["sig"], shard["empty"], b, r)
    return shard


def _save_shard(root: Path, k: int, shard: dict, extra: dict | None = None) -> None:
    """Arrays first, the meta file last (renamed into place): its presence marks a whole shard."""
    for name in ("sig", "band_h", "band_row"):
        tmp = root / f"{name}_{k:05d}.tmp.npy"
        np.save(tmp, shard[name])
        os.replace(tmp, root / f"{name}_{k:05d}.npy")
    tmp = root / f"meta_{k:05d}.tmp.npz"
    np.savez(tmp, exact=shard["exact"], empty=shard["empty"], **(extra or {}))
    os.replace(tmp, root / f"meta_{k:05d}.npz")


_FORKED_TEXTS: Sequence[str] = ()  # set before a fork pool starts, so texts are not pickled


def _text_job(args: tuple) -> dict:
    hasher, texts, lo, hi, b, r, root, k = args
    shard = _compute_shard(hasher, _FORKED_TEXTS[lo:hi] if texts is None else texts, b, r)
    if root is None:
        return shard
    _save_shard(Path(root), k, shard)
    return {"n": hi - lo}


def _pool_map(fn: Callable, jobs: list, workers: int) -> Iterable:
    # a daemonic process (a pool worker of some runner) may not start children: run inline
    if workers <= 1 or len(jobs) <= 1 or mp.current_process().daemon:
        yield from map(fn, jobs)
        return
    _char_classes()  # built once here, inherited by forked workers
    with _context().Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)


def _context() -> mp.context.BaseContext:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else (os.cpu_count() or 1))


# ----------------------------------------------------------------------------- decisions

def _decide(store: _MemStore, rank: np.ndarray, threshold: float, partitions: int = 1) -> dict:
    """Exact groups, then LSH + verification + union-find. Returns per-document arrays:
    keeper (global index, -1 = kept), kind (0 kept, 1 exact, 2 near), jaccard; and counts."""
    n = len(store.exact)
    idx = np.arange(n)
    keeper = np.full(n, -1, np.int64)
    kind = np.zeros(n, np.uint8)
    jac = np.ones(n, np.float32)
    if n == 0:
        return {"keeper": keeper, "kind": kind, "jaccard": jac, "candidate_checks": 0,
                "confirmed_pairs": 0, "clusters": 0}
    order = np.lexsort((idx, -rank, store.exact))  # newest, then first seen, leads each group
    ex = store.exact[order]
    lead = np.concatenate([[True], ex[1:] != ex[:-1]])
    rep = order[np.maximum.accumulate(np.where(lead, np.arange(n), 0))]
    dup = order[~lead]
    keeper[dup], kind[dup] = rep[~lead], 1

    skip = kind != 0  # exact copies (and empty documents, never in band records) sit out
    bounds = [int(i * (1 << 64) // partitions) for i in range(partitions)] + [None]
    us, vs, ss, checked = [], [], [], 0
    for p in range(partitions):
        hs, ds = [], []
        for k in range(len(store.sizes)):
            h, row = store.band_slice(k, bounds[p], bounds[p + 1])
            hs.append(np.asarray(h))
            ds.append(np.asarray(row, np.int64) + store.starts[k])
        h, d = np.concatenate(hs), np.concatenate(ds)
        live = ~skip[d]
        u, v, s, c = _bucket_pairs(h[live], d[live], functools.partial(_similarity, store),
                                   threshold)
        us.append(u), vs.append(v), ss.append(s)
        checked += c
    u, v = np.concatenate(us), np.concatenate(vs)
    if len(u):
        nodes, root = _components(u, v)
        order = np.lexsort((nodes, -rank[nodes], root))
        lead = np.concatenate([[True], root[order][1:] != root[order][:-1]])
        first = order[np.maximum.accumulate(np.where(lead, np.arange(len(order)), 0))]
        near, near_keep = nodes[order[~lead]], nodes[first[~lead]]
        keeper[near], kind[near] = near_keep, 2
        jac[near] = _similarity(store, near, near_keep)
        # an exact copy whose representative went as a near copy follows it to its keeper
        moved = np.flatnonzero((kind == 1) & (kind[np.maximum(keeper, 0)] == 2))
        keeper[moved], kind[moved], jac[moved] = (keeper[keeper[moved]], 2,
                                                  jac[keeper[moved]])
        clusters = len(np.unique(root))
    else:
        clusters = 0
    return {"keeper": keeper, "kind": kind, "jaccard": jac, "candidate_checks": checked,
            "confirmed_pairs": len(u), "clusters": clusters}


def _reason(kind: int, kept_id: str, jac: float) -> str:
    if kind == 1:
        return f"exact duplicate of {kept_id}"
    return f"near-duplicate of {kept_id} (jaccard~{jac:.2f})"


def _recency(doc: dict) -> tuple[str, str]:
    dump, date = doc.get("dump") or "", doc.get("date") or ""
    return (dump if isinstance(dump, str) else str(dump),
            date if isinstance(date, str) else str(date))


def _ids(docs: Sequence[dict]) -> list[str]:
    return [str(i if d.get("id") is None else d["id"]) for i, d in enumerate(docs)]


def _ranks(keys: list[tuple[str, str]]) -> np.ndarray:
    table = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.fromiter((table[k] for k in keys), np.int64, len(keys))


# ----------------------------------------------------------------------------- public API

def exact_dedup(docs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Drop exact copies (same text once lower-cased, whitespace runs collapsed to one space
    and stripped); each group keeps its newest document by (dump, date), else the first seen.
    Returns (kept, removed) like `minhash_dedup`."""
    ids = _ids(docs)
    exact = MinHasher(num_perm=1).analyse([d.get("text") or "" for d in docs])["exact"]
    best: dict[int, int] = {}
    for i, d in enumerate(docs):
        j = best.setdefault(int(exact[i]), i)
        if j != i and _recency(d) > _recency(docs[j]):
            best[int(exact[i])] = i
    winners = set(best.values())
    kept = [d for i, d in enumerate(docs) if i in winners]
    removed = []
    for i, d in enumerate(docs):
        if i not in winners:
            w = best[int(exact[i])]
            removed.append({**d, "stage": "dedup", "reason": _reason(1, ids[w], 1.0),
                            "duplicate_of": ids[w], "jaccard": 1.0})
    return kept, removed


def minhash_dedup(docs: Sequence[dict], threshold: float = 0.7, num_perm: int = 128,
                  ngram: int = 5, workers: int | None = None, workdir: str | Path | None = None,
                  seed: int = 0, shard_chars: int = 1 << 22, partition_bytes: int = 1 << 28,
                  band_weights: tuple[float, float] = (0.1, 0.9)
                  ) -> tuple[list[dict], list[dict]]:
    """Exact then near-duplicate removal over in-memory documents.

    Returns (kept, removed): `kept` are the input dicts themselves, in input order; `removed`
    are copies (input order) with "stage": "dedup", "reason" ("exact duplicate of <id>" or
    "near-duplicate of <id> (jaccard~0.83)", the id of the document kept for the cluster),
    "duplicate_of" and "jaccard" (estimated from signatures). With `workdir`, signatures and
    band records go through disk as in `dedup_files` (same result)."""
    hasher = MinHasher(num_perm, ngram, seed)
    b, r = optimal_bands(threshold, num_perm, tuple(band_weights))
    nw = _workers(workers)
    texts = [d.get("text") or "" for d in docs]
    total = sum(map(len, texts))
    spans = _batches([len(t) for t in texts], max(1 << 16, min(shard_chars, total // (4 * nw) + 1)))
    root = None
    if workdir is not None:
        root = Path(workdir) / "dedup_shards"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    global _FORKED_TEXTS
    forked = nw > 1 and len(spans) > 1 and _context().get_start_method() == "fork"
    jobs = [(hasher, None if forked else texts[lo:hi], lo, hi, b, r,
             None if root is None else str(root), k) for k, (lo, hi) in enumerate(spans)]
    _FORKED_TEXTS = texts if forked else ()
    try:
        shards = list(_pool_map(_text_job, jobs, nw))
    finally:
        _FORKED_TEXTS = ()
    store = _MemStore(shards) if root is None else _DiskStore(root, len(jobs))
    parts = 1 if root is None else _partition_count(len(docs) * b, partition_bytes)
    dec = _decide(store, _ranks([_recency(d) for d in docs]), threshold, parts)
    if root is not None:
        del store
        shutil.rmtree(root, ignore_errors=True)
    ids = _ids(docs)
    kept, removed = [], []
    for i, d in enumerate(docs):
        k = dec["keeper"][i]
        if k < 0:
            kept.append(d)
        else:
            kid, j = ids[k], round(float(dec["jaccard"][i]), 4)
            removed.append({**d, "stage": "dedup", "reason": _reason(dec["kind"][i], kid, j),
                            "duplicate_of": kid, "jaccard": j})
    return kept, removed


def _partition_count(records: int, partition_bytes: int = 1 << 28) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, records * 16 / partition_bytes))))



# ----------------------------------------------------------------------------- files

def _line_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes`, each starting at a line start (-1: whole gz file)."""
    if path.suffix == ".gz":
        return [(0, -1)]
    size, cuts = path.stat().st_size, [0]
    with open(path, "rb") as f:
        for target in range(chunk_bytes, size, chunk_bytes):
            f.seek(target - 1)
            f.readline()
            if cuts[-1] < f.tell() < size:
                cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


def _read_lines(path: str, start: int, end: int) -> list[bytes]:
    if end < 0:
        import gzip
        with gzip.open(path, "rb") as f:
            data = f.read()
    else:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _file_job(args: tuple) -> None:
    """Pass 1 over one byte range: parse, analyse, spill the shard, then mark it done."""
    hasher, path, start, end, b, r, root, k = args
    root, name = Path(root), Path(path).name
    lines = _read_lines(path, start, end)
    docs, where, bad, off = [], [], [], max(start, 0)
    for i, line in enumerate(lines):
        here, off = off, off + len(line) + 1
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            bad.append((i, f"invalid JSON: {e}"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            bad.append((i, "not an object with a string 'text' field"))
            continue
        if doc.get("id") is None:
            doc["id"] = f"{name}@{here}"
        docs.append(doc)
        where.append(i)
    keys = [_recency(d) for d in docs]
    uniq = sorted(set(keys))
    rank = {key: i for i, key in enumerate(uniq)}
    shard = _compute_shard(hasher, [d["text"] for d in docs], b, r)
    _save_shard(root, k, shard, {"key_idx": np.array([rank[x] for x in keys], np.int64),
                                 "line": np.array(where, np.int64)})
    (root / f"ids_{k:05d}.json").write_text(json.dumps([str(d["id"]) for d in docs]))
    info = {"n": len(docs), "keys": uniq, "bad": bad, "lines": len(lines),
            "bytes": sum(len(lines[i]) for i in where)}
    (root / f"info_{k:05d}.tmp").write_text(json.dumps(info))
    os.replace(root / f"info_{k:05d}.tmp", root / f"info_{k:05d}.json")


def _write_job(args: tuple) -> dict:
    """Pass 2 over one byte range: kept lines verbatim, removed documents annotated."""
    path, start, end, line_of, keeper, kind, jac, kept_ids, kept_part, removed_part = args
    lines = _read_lines(path, start, end)
    counts = {"kept": [0, 0], "exact duplicate": [0, 0], "near-duplicate": [0, 0]}
    kept, removed = [], []
    for i, li in enumerate(line_of.tolist()):
        line = lines[li].rstrip(b"\r")
        c = counts["kept" if keeper[i] < 0 else "exact duplicate" if kind[i] == 1 else
                   "near-duplicate"]
        c[0] += 1
        c[1] += len(lines[li])
        if keeper[i] < 0:
            kept.append(line)
            continue
        doc = json.loads(line)
        if doc.get("id") is None:  # the id pass 1 gave it: file name @ byte offset
            doc["id"] = f"{Path(path).name}@{max(start, 0) + sum(len(x) + 1 for x in lines[:li])}"
        kid, j = kept_ids[int(keeper[i])], round(float(jac[i]), 4)
        removed.append(json.dumps({**doc, "stage": "dedup", "reason": _reason(int(kind[i]), kid, j),
                                   "duplicate_of": kid, "jaccard": j}, ensure_ascii=False))
    Path(kept_part).write_bytes(b"".join(x + b"\n" for x in kept))
    Path(removed_part).write_text("".join(x + "\n" for x in removed), encoding="utf-8")
    return counts


def dedup_files(input_paths: Sequence[str | Path], output_dir: str | Path,
                threshold: float = 0.7, num_perm: int = 128, ngram: int = 5,
                workers: int | None = None, workdir: str | Path | None = None, seed: int = 0,
                chunk_bytes: int = 8 << 20, partition_bytes: int = 1 << 28,
                band_weights: tuple[float, float] = (0.1, 0.9), keep_workdir: bool = False) -> dict:
    """Streaming dedup of jsonl (or jsonl.gz) files into `output_dir`: `kept.jsonl` (the kept
    lines, byte for byte, in input order), `removed.jsonl` (each removed document with
    "stage", "reason", "duplicate_of", "jaccard") and `dedup_stats.json`; returns the stats.

    Inputs are cut into line-aligned byte ranges; a process pool computes each range's
    signatures and band records into `workdir` (default `output_dir/.dedup_work`), bands are
    processed in hash-range partitions of about `partition_bytes`, and outputs are written
    to temporary names and renamed. A rerun with the same inputs and parameters skips the
    shards already done, or everything if the outputs are complete. Malformed lines are
    counted and reported (file and line) in the stats, never written."""
    paths = [Path(p) for p in input_paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"dedup input not found: {p}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(workdir) if workdir is not None else out / ".dedup_work"
    manifest = {"inputs": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                           for p in paths],
                "threshold": threshold, "num_perm": num_perm, "ngram": ngram, "seed": seed,
                "chunk_bytes": chunk_bytes, "band_weights": list(band_weights)}
    stats_path = out / "dedup_stats.json"
    if all(f.is_file() for f in (stats_path, out / "kept.jsonl", out / "removed.jsonl")):
        old = json.loads(stats_path.read_text())
        if old.get("manifest") == manifest:
            return old
    root = work / "dedup_shards"  # the only thing created (and later deleted) under workdir
    man_path = root / "manifest.json"
    if root.exists() and (not man_path.is_file() or json.loads(man_path.read_text()) != manifest):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    man_path.write_text(json.dumps(manifest))

    t0 = time.perf_counter()
    hasher, nw = MinHasher(num_perm, ngram, seed), _workers(workers)
    b, r = optimal_bands(threshold, num_perm, tuple(band_weights))
    ranges = [(str(p), s, e) for p in paths for s, e in _line_ranges(p, chunk_bytes)]
    todo = [(hasher, p, s, e, b, r, str(root), k) for k, (p, s, e) in enumerate(ranges)
            if not (root / f"info_{k:05d}.json").is_file()]
    for _ in _pool_map(_file_job, todo, nw):
        pass
    infos = [json.loads((root / f"info_{k:05d}.json").read_text()) for k in range(len(ranges))]
    t1 = time.perf_counter()

    store = _DiskStore(root, len(ranges))
    keys = sorted({tuple(x) for info in infos for x in info["keys"]})
    table = {x: i for i, x in enumerate(keys)}
    rank = np.concatenate([np.asarray([table[tuple(x)] for x in info["keys"]] or [0], np.int64)[
        np.load(root / f"meta_{k:05d}.npz")["key_idx"]] for k, info in enumerate(infos)]
        or [np.empty(0, np.int64)])
    n = len(rank)
    parts = _partition_count(n * b, partition_bytes)
    dec = _decide(store, rank, threshold, parts)
    t2 = time.perf_counter()

    keeper, starts = dec["keeper"], store.starts
    needed = np.unique(keeper[keeper >= 0])
    id_of: dict[int, str] = {}
    for k in np.unique(np.searchsorted(starts, needed, "right") - 1):
        ids = json.loads((root / f"ids_{k:05d}.json").read_text())
        for g in needed[(needed >= starts[k]) & (needed < starts[k + 1])]:
            id_of[int(g)] = ids[int(g) - starts[k]]
    jobs = []
    for k, (p, s, e) in enumerate(ranges):
        lo, hi = starts[k], starts[k + 1]
        kk = keeper[lo:hi]
        jobs.append((p, s, e, np.load(root / f"meta_{k:05d}.npz")["line"], kk,
                     dec["kind"][lo:hi], dec["jaccard"][lo:hi],
                     {int(g): id_of[int(g)] for g in np.unique(kk[kk >= 0])},
                     str(root / f"kept_{k:05d}.part"), str(root / f"removed_{k:05d}.part")))
    totals = {"kept": [0, 0], "exact duplicate": [0, 0], "near-duplicate": [0, 0]}
    for counts in _pool_map(_write_job, jobs, nw):
        for key, (c, nb) in counts.items():
            totals[key][0] += c
            totals[key][1] += nb
    for name in ("kept", "removed"):
        tmp = out / f"{name}.jsonl.tmp"
        with open(tmp, "wb") as fo:
            for k in range(len(ranges)):
                with open(root / f"{name}_{k:05d}.part", "rb") as fi:
                    shutil.copyfileobj(fi, fo, 1 << 22)
        os.replace(tmp, out / f"{name}.jsonl")
    t3 = time.perf_counter()

    malformed, line_base, prev = [], 0, None
    for (p, _, _), info in zip(ranges, infos):
        line_base = 0 if p != prev else line_base
        prev = p
        malformed += [{"file": p, "line": line_base + i + 1, "error": err}
                      for i, err in info["bad"]]
        line_base += info["lines"]
    removed = totals["exact duplicate"][0] + totals["near-duplicate"][0]
    stats = {
        "stage": "dedup", "docs_in": n, "bytes_in": sum(i["bytes"] for i in infos),
        "docs_kept": totals["kept"][0], "bytes_kept": totals["kept"][1], "docs_removed": removed,
        "removed_by_reason": {k: totals[k][0] for k in ("exact duplicate", "near-duplicate")},
        "bytes_removed_by_reason": {k: totals[k][1] for k in ("exact duplicate", "near-duplicate")},
        "malformed": len(malformed), "malformed_examples": malformed[:20],
        "threshold": threshold, "num_perm": num_perm, "ngram": ngram, "bands": b, "rows": r,
        "shards": len(ranges), "partitions": parts, "candidate_checks": dec["candidate_checks"],
        "confirmed_pairs": dec["confirmed_pairs"], "clusters": dec["clusters"],
        "seconds": {"signatures": round(t1 - t0, 3), "clustering": round(t2 - t1, 3),
                    "writing": round(t3 - t2, 3)},
        "manifest": manifest,
    }
    tmp = out / "dedup_stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, stats_path)
    del store
    if not keep_workdir:
        shutil.rmtree(root, ignore_errors=True)
        if workdir is None and not any(work.iterdir()):
            work.rmdir()
    return stats
