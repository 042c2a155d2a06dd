"""Characters per token: project-trained byte-level BPE vs the official InternLM2 tokenizer.

Trains BPE tokenizers (vocab 8192 and 32768) on the Python standard library's sources plus
generated Chinese, then measures compression on held-out English prose (docstrings of
held-out modules + a hand-written paragraph), Chinese (a natural paragraph, mostly characters
the generated corpus lacks), held-out generated Chinese, and code (held-out modules).
Last line: one JSON object with every figure.

    python bench/tokenizer_compression.py [--max-mb 12] [--vocab 8192 32768]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from internlm2.tokenizer import (
    SAMPLE_TEXTS,
    compression_table,
    format_table,
    load_tokenizer,
    official_tokenizer_path,
    synthetic_chinese,
    train_tokenizer,
)


def stdlib_split(max_chars: int) -> tuple[list[str], list[str]]:
    """(training sources, held-out sources): every 10th file is held out."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    train, held, size = [], [], 0
    for k, p in enumerate(files):
        text = p.read_text(encoding="utf-8", errors="replace")
        if k % 10 == 0:
            held.append(text)
        elif size < max_chars:
            train.append(text)
            size += len(text)
    return train, held


def docstrings(sources: list[str], limit: int) -> str:
    out, size = [], 0
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
                    size += len(doc)
        if size > limit:
            break
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-mb", type=float, default=12.0, help="MB of stdlib code to train on")
    ap.add_argument("--zh-sentences", type=int, default=150_000)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    args = ap.parse_args()

    train_code, held_code = stdlib_split(int(args.max_mb * 1e6))
    zh = synthetic_chinese(args.zh_sentences, seed=0)
    corpus = train_code + [zh[i : i + 100_000] for i in range(0, len(zh), 100_000)]
    mb = sum(len(t.encode()) for t in corpus) / 1e6
    samples = {
        "english": SAMPLE_TEXTS["english"] + "\n\n" + docstrings(held_code, 200_000),
        "chinese": SAMPLE_TEXTS["chinese"],  # natural text: characters outside the corpus
        "zh-gen": synthetic_chinese(2000, seed=12345),  # held-out text from the generator
        "code": "\n".join(held_code)[:400_000],
    }

    tokenizers, train_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.vocab:
            t0 = time.perf_counter()
            tokenizers[f"bpe-{v}"] = train_tokenizer(corpus, v, Path(tmp) / str(v))
            train_s[f"bpe-{v}"] = round(time.perf_counter() - t0, 2)
    official = official_tokenizer_path()
    if official is not None:
        tokenizers["official-92544"] = load_tokenizer(official)

    table = compression_table(tokenizers, samples)
    print(f"training corpus: {mb:.1f} MB ({len(train_code)} stdlib files + generated Chinese)")
    print(f"training seconds: {train_s}")
    print(format_table(table))
    print(json.dumps({"corpus_mb": round(mb, 2), "train_seconds": train_s,
                      "chars_per_token": table}))


if __name__ == "__main__":
    main()
