"""MinHash dedup: ours vs datasketch (MinHash + MinHashLSH) vs datatrove's MinHash stages.

One synthetic corpus (English-like text from a generated Zipf vocabulary plus Chinese
character text; families of distinct documents sharing sentences, near copies at Jaccard about
0.78-0.95, exact copies), the same 5-gram shingles (`internlm2.data.dedup.shingles` feeds the
other libraries), 128 permutations and threshold 0.7 for everyone: datasketch and datatrove
band 14 x 9 (datasketch's choice) and take every candidate; ours bands 20 x 6 and verifies each
candidate against the full signatures (see internlm2/data/dedup.py). Each method runs in a
fresh subprocess; the parent samples the memory of that process and its children every 50 ms
(peak PSS, which counts pages that forked workers share once; peak RSS sum in the JSON).
Throughput = MB of document text / wall seconds of the dedup (signatures, LSH, clustering;
in-memory methods start from loaded documents, file methods read and write jsonl files).

Quality, against exact Jaccard of the shingle sets: recall = share of the sampled true pairs
(planted pairs and siblings, plus random pairs, with exact Jaccard >= 0.7) that a method puts in
one cluster; precision = share of removed documents (a sample of up to 4000) with exact Jaccard
>= 0.7 to some other member of their cluster; "vs kept" asks it of the cluster's kept document
(union-find chains, a -> near copy -> its near copy, can fall below 0.7 end to end). `ratio`
compares one core with one core: ours with 1 worker over datasketch (single-process).

    python bench/dedup.py [--mb 30] [--workers 2] [--datatrove-python PY]

Last line: one JSON object with every figure; `ratio` = ours (1 worker) MB/s / datasketch MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout too

from internlm2.data.dedup import optimal_bands, shingles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_results  # noqa: E402

DUMPS = ["CC-MAIN-2021-04", "CC-MAIN-2022-21", "CC-MAIN-2023-50"]


# ----------------------------------------------------------------------------- corpus

def make_corpus(mb: float, seed: int = 0, zh_share: float = 0.15):
    """(docs, planted pairs): families of 3 siblings sharing ~60% of a sentence pool;
    30% of documents get a near copy, 10% an exact copy, 5% a near copy of a near copy."""
    rng = np.random.default_rng(seed)
    syl = np.array(["ka", "to", "ri", "en", "sa", "mo", "lu", "th", "an", "or", "is", "pe", "di",
                    "ne", "qu", "ar", "el", "in", "os", "um", "be", "co", "fa", "gi", "st", "pr",
                    "ch", "wa", "le", "ve"])
    words = set()
    while len(words) < 30000:
        words.update("".join(rng.choice(syl, rng.integers(1, 5))) for _ in range(5000))
    vocab = {"en": np.array(sorted(words)[:30000]),
             "zh": np.array([chr(c) for c in range(0x4E00, 0x4E00 + 3500)])}
    zipf = {}
    for k, v in vocab.items():
        weight = 1.0 / np.arange(1, len(v) + 1) ** 1.05
        zipf[k] = weight / weight.sum()

    def sentence(kind):
        n = rng.integers(8, 18) if kind == "en" else rng.integers(12, 30)
        w = vocab[kind][rng.choice(len(vocab[kind]), n, p=zipf[kind])]
        return " ".join(w).capitalize() + "." if kind == "en" else "".join(w) + "。"

    def near(text, kind):
        toks = text.split(" ") if kind == "en" else list(text)
        target = rng.uniform(0.78, 0.95)
        edits = max(1, round(len(toks) * (1 - target) / (5 * (1 + target))))
        for p in rng.choice(len(toks), min(edits, len(toks)), replace=False):
            toks[p] = vocab[kind][rng.integers(len(vocab[kind]))]
        return " ".join(toks) if kind == "en" else "".join(toks)

    docs, planted, size = [], [], 0

    def add(text, kind):
        nonlocal size
        docs.append({"id": f"doc{len(docs):06d}", "text": text, "lang": kind,
                     "dump": DUMPS[rng.integers(3)], "source": "bench"})
        size += len(text.encode())
        return len(docs) - 1

    while size < mb * 1e6:
        kind = "zh" if rng.random() < zh_share else "en"
        pool = [sentence(kind) for _ in range(rng.integers(12, 40))]
        sep = " " if kind == "en" else ""
        sibs = []
        for _ in range(3):
            sents = [s for s in pool if rng.random() < 0.6] + [sentence(kind) for _ in range(5)]
            rng.shuffle(sents)
            base = sep.join(sents)
            i = add(base, kind)
            planted += [(j, i) for j in sibs]
            sibs.append(i)
            roll = rng.random()
            if roll < 0.3:
                planted.append((i, add(near(base, kind), kind)))
            elif roll < 0.4:
                planted.append((i, add(base, kind)))
            elif roll < 0.45:
                a = add(near(base, kind), kind)
                b = add(near(docs[a]["text"], kind), kind)
                planted += [(i, a), (a, b), (i, b)]
    order = rng.permutation(len(docs))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    docs = [docs[i] for i in order]
    for k, d in enumerate(docs):
        d["id"] = f"doc{k:06d}"
    planted = [tuple(sorted((int(where[a]), int(where[b])))) for a, b in planted]
    randoms = {tuple(sorted(map(int, rng.choice(len(docs), 2, replace=False))))
               for _ in range(2000)}
    return docs, sorted(set(planted) | randoms)


def exact_jaccard(docs, pairs, cache):
    out = []
    for a, b in pairs:
        for i in (a, b):
            if i not in cache:
                cache[i] = shingles(docs[i]["text"])
        sa, sb = cache[a], cache[b]
        out.append(len(sa & sb) / max(1, len(sa | sb)))
    return np.array(out)


# ----------------------------------------------------------------------------- methods

def load_docs(paths):
    return [json.loads(line) for p in paths
            for line in Path(p).read_text(encoding="utf-8").splitlines()]


def run_ours(paths, workers, work):
    from internlm2.data.dedup import minhash_dedup
    docs = load_docs(paths)
    t = time.perf_counter()
    _, removed = minhash_dedup(docs, workers=workers)
    sec = time.perf_counter() - t
    return sec, [(r["id"], r["duplicate_of"]) for r in removed]


def run_ours_files(paths, workers, work):
    from internlm2.data.dedup import dedup_files
    t = time.perf_counter()
    dedup_files(paths, Path(work) / "out", workers=workers, workdir=Path(work) / "tmp")
    sec = time.perf_counter() - t
    removed = [json.loads(x) for x in
               (Path(work) / "out" / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    return sec, [(r["id"], r["duplicate_of"]) for r in removed]


def run_datasketch(paths, workers, work):
    from datasketch import MinHash, MinHashLSH
    docs = load_docs(paths)
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    parent = list(range(len(docs)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, d in enumerate(docs):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingles(d["text"])])
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the first seen document is kept
        lsh.insert(i, m)
    sec = time.perf_counter() - t
    return sec, [(docs[i]["id"], docs[find(i)]["id"]) for i in range(len(docs)) if find(i) != i]


def run_datatrove(paths, workers, work):
    import datatrove.pipeline.dedup.minhash as dm
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    dm.load_word_tokenizer = lambda language: None  # English needs spaCy; we pass shingles

    class Signature(dm.MinhashDedupSignature):
        def get_shingles(self, text):  # the same 5-gram shingles as everyone else
            return np.fromiter((self._hash_func(s.encode()) for s in shingles(text)),
                               np.uint64).reshape((-1, 1))

    b, r = optimal_bands(0.7, 128)
    cfg = dm.MinhashConfig(n_grams=5, num_buckets=b, hashes_per_bucket=r)
    w, data = Path(work), str(Path(paths[0]).parent)
    common = {"start_method": "fork"}
    t = time.perf_counter()
    LocalPipelineExecutor([JsonlReader(data, glob_pattern="*.jsonl"),
                           Signature(str(w / "sigs"), config=cfg)],
                          tasks=len(paths), workers=workers, logging_dir=str(w / "log1"),
                          **common).run()
    LocalPipelineExecutor([dm.MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=cfg)],
                          tasks=b, workers=workers, logging_dir=str(w / "log2"), **common).run()
    LocalPipelineExecutor([dm.MinhashDedupCluster(str(w / "buckets"), str(w / "ids"), config=cfg,
                                                  save_cluster_id=True)], tasks=1,
                          logging_dir=str(w / "log3"), **common).run()
    LocalPipelineExecutor([JsonlReader(data, glob_pattern="*.jsonl"),
                           dm.MinhashDedupFilter(str(w / "ids"), load_cluster_ids=True,
                                                 exclusion_writer=JsonlWriter(str(w / "removed"))),
                           JsonlWriter(str(w / "kept"))],
                          tasks=len(paths), workers=workers, logging_dir=str(w / "log4"),
                          **common).run()
    sec = time.perf_counter() - t
    import gzip
    keeper, removed = {}, []
    for sub, is_removed in (("kept", False), ("removed", True)):
        for f in sorted((w / sub).glob("*")):
            for line in gzip.decompress(f.read_bytes()).decode("utf-8").splitlines():
                d = json.loads(line)
                cid = d["metadata"].get("minhash_cluster_id", -1)
                if is_removed:
                    removed.append((d["id"], cid))
                elif cid != -1:
                    keeper[cid] = d["id"]
    return sec, [(i, keeper.get(c, i)) for i, c in removed]


METHODS = {"ours": run_ours, "ours_1w": run_ours, "ours_files": run_ours_files,
           "datasketch": run_datasketch, "datatrove": run_datatrove}


# ----------------------------------------------------------------------------- harness

def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of `pid` and all its descendants. PSS splits pages shared after a fork
    between the processes sharing them, so its sum over a process tree does not double count."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        vals = {}
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    vals[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        rss += vals.get("Rss", 0)
        pss += vals.get("Pss", 0)
    return rss, pss


def measure(method, paths, workers, python, timeout=600):
    with tempfile.TemporaryDirectory() as work:
        res = Path(work) / "result.json"
        cmd = [python, __file__, "--child", method, "--workers", str(workers), "--result",
               str(res), "--work", work, *map(str, paths)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak, done = [0, 0], threading.Event()

        def sample():
            while not done.is_set():
                peak[:] = map(max, peak, tree_memory(proc.pid))
                time.sleep(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        done.set()
        th.join()
        if proc.returncode != 0 or not res.exists():
            return {"error": (out or "").strip().splitlines()[-1:] or ["failed"]}
        result = json.loads(res.read_text())
        result["peak_rss_mb"], result["peak_pss_mb"] = peak[0] / 2**20, peak[1] / 2**20
        return result


def child(args):
    workers = 1 if args.child == "ours_1w" else args.workers
    sec, pairs = METHODS[args.child](args.paths, workers, args.work)
    Path(args.result).write_text(json.dumps({"seconds": sec, "pairs": pairs}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datatrove-python",
                    default=os.environ.get("DATATROVE_PYTHON", sys.executable),
                    help="an interpreter with datatrove + xxhash (e.g. a separate venv)")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dedup.json"))
    ap.add_argument("--child"), ap.add_argument("--result"), ap.add_argument("--work")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args)

    t = time.perf_counter()
    docs, pairs = make_corpus(args.mb, args.seed)
    text_mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    cache: dict = {}
    sims = exact_jaccard(docs, pairs, cache)
    truth = [p for p, s in zip(pairs, sims) if s >= 0.7]
    index = {d["id"]: i for i, d in enumerate(docs)}
    print(f"corpus: {len(docs)} documents, {text_mb:.1f} MB of text, {len(pairs)} sampled pairs "
          f"({len(truth)} with exact Jaccard >= 0.7), built in {time.perf_counter() - t:.0f}s",
          file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "corpus" / f"part_{k}.jsonl" for k in range(4)]
        paths[0].parent.mkdir()
        for k, p in enumerate(paths):
            chunk = docs[k * len(docs) // 4:(k + 1) * len(docs) // 4]
            p.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chunk))
        for name in METHODS:
            if name in args.skip:
                results[name] = {"status": "skipped"}
                continue
            python = sys.executable
            if name == "datatrove":
                python = args.datatrove_python
                probe = subprocess.run([python, "-c", "import datatrove, xxhash"],
                                       capture_output=True, text=True, check=False)
                if probe.returncode:
                    results[name] = {"status": "not run: datatrove (+ xxhash) not importable by "
                                               f"{python} (pip install datatrove xxhash)"}
                    continue
            r = measure(name, paths, args.workers, python)
            if "error" in r:
                results[name] = {"status": f"not run: {r['error'][0][:200]}"}
                continue
            removed = [(index[a], index[b]) for a, b in r["pairs"]]
            root = {a: b for a, b in removed}
            same = [root.get(a, a) == root.get(b, b) for a, b in truth]
            members: dict[int, list[int]] = {}
            for a, b in removed:
                members.setdefault(b, [b]).append(a)
            sample = removed[:: max(1, len(removed) // 4000)]
            vs_kept = exact_jaccard(docs, sample, cache) >= 0.7
            in_cluster = [ok or any(exact_jaccard(docs, [(a, m)], cache)[0] >= 0.7
                                    for m in members[b][:50] if m != a)
                          for (a, b), ok in zip(sample, vs_kept)]
            results[name] = {"status": "ok", "seconds": round(r["seconds"], 3),
                             "mb_per_s": round(text_mb / r["seconds"], 2),
                             "peak_pss_mb": round(r["peak_pss_mb"], 1),
                             "peak_rss_mb": round(r["peak_rss_mb"], 1), "removed": len(removed),
                             "precision": round(float(np.mean(in_cluster)) if sample else 1.0, 4),
                             "precision_vs_kept": round(float(np.mean(vs_kept)) if sample else 1.0,
                                                        4),
                             "recall": round(float(np.mean(same)) if same else 1.0, 4)}
            print(f"  {name}: {results[name]}", file=sys.stderr)

    labels = {"ours": f"ours minhash_dedup ({args.workers} workers)",
              "ours_1w": "ours minhash_dedup (1 worker)",
              "ours_files": f"ours dedup_files, jsonl->jsonl ({args.workers} workers)",
              "datasketch": "datasketch MinHash+MinHashLSH",
              "datatrove": f"datatrove MinHash stages ({args.workers} workers)"}
    b, r = optimal_bands(0.7, 128)
    ob, orr = optimal_bands(0.7, 128, (0.1, 0.9))
    print(f"\nMinHash dedup, {len(docs)} docs / {text_mb:.1f} MB text, 128 perms, 5-grams, "
          f"threshold 0.7 (others {b} bands x {r} rows; ours {ob} x {orr} + verification), "
          f"{args.workers} workers where parallel")
    print(f"{'method':<46}{'MB/s':>8}{'seconds':>9}{'PSS MB':>9}{'removed':>9}"
          f"{'precision':>11}{'(vs kept)':>10}{'recall':>8}")
    for name, res in results.items():
        if res["status"] != "ok":
            print(f"{labels[name]:<46}  {res['status']}")
            continue
        print(f"{labels[name]:<46}{res['mb_per_s']:>8.2f}{res['seconds']:>9.2f}"
              f"{res['peak_pss_mb']:>9.0f}{res['removed']:>9}{res['precision']:>11.4f}"
              f"{res['precision_vs_kept']:>10.4f}{res['recall']:>8.4f}")
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    summary = {"corpus": {"docs": len(docs), "text_mb": round(text_mb, 2),
                          "sampled_pairs": len(pairs),
                          "true_pairs": len(truth), "seed": args.seed},
               "workers": args.workers, "bands_rows": {"ours": [ob, orr], "others": [b, r]},
               "methods": results}
    # ratio: one core each (ours with 1 worker vs datasketch, which is single-process), so it
    # does not hang on how busy the second core is; the parallel and file figures sit beside it
    if "datasketch" in ok:
        base = ok["datasketch"]["mb_per_s"]
        for key, name in (("ratio", "ours_1w"), ("ratio_parallel", "ours"),
                          ("ratio_files", "ours_files")):
            if name in ok:
                summary[key] = round(ok[name]["mb_per_s"] / base, 2)
        if "ours_1w" in ok:
            summary["floor"] = 5.0
            summary["meets_floor"] = bool(summary["ratio"] >= 5.0 and
                                          ok["ours_1w"]["recall"] >= ok["datasketch"]["recall"])
    if "datatrove" in ok and "ours_files" in ok:
        summary["ratio_files_vs_datatrove"] = round(ok["ours_files"]["mb_per_s"] /
                                                    ok["datatrove"]["mb_per_s"], 2)
    emit_results(summary, args.out)


if __name__ == "__main__":
    main()
