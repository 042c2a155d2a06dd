"""Readers: documents from jsonl (.gz/.zst), parquet, text files, folders, source-code
repositories and Hugging Face datasets.

A document is a dict `{"id": str, "text": str, ...metadata}`. Every document leaving a reader
has a `source` (the file, repository or dataset it came from, unless the input already named
one) and an `id` (kept when the input has one; otherwise a stable hash of the source and the
line/row/paragraph/path it came from, so a rerun or a different sharding gives the same ids).

Malformed input never stops a run and never disappears without a trace: a line that is not
valid UTF-8, not valid JSON, not a JSON object, or has no string text field is skipped and
recorded in a `ReadReport` as `(file, line, kind, message)`, with counts per kind and per file,
and logged (the first few per file) on the `internlm2.data.readers` logger.

Inputs (`read_documents`):
- a file: `.jsonl`/`.ndjson` (optionally `.gz` or `.zst`), `.parquet`, `.txt`/`.md`
  (optionally `.gz`/`.zst`; one document per file, or per blank-line-separated paragraph);
- a folder: every such file below it, recursively, in sorted order (hidden entries skipped,
  other files recorded in `ReadReport.skipped`); a folder holding `.git` is read as a code
  repository instead;
- `code:PATH` (or `repo:PATH`): a source-code folder, one document per file;
- `hf:owner/name[:split]`: a Hugging Face dataset (needs the `datasets` package and the hub);
- an `InputPart` from `split_inputs` (one byte range of a large jsonl file).

Optional dependencies: `zstandard` for .zst, `pyarrow` for parquet, `datasets` for `hf:`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

JSONL_EXTS = (".jsonl", ".ndjson")
TEXT_EXTS = (".txt", ".md", ".text")
PARQUET_EXTS = (".parquet",)
COMPRESSIONS = (".gz", ".zst")
_LOG_PER_FILE = 5  # errors logged per file; all are counted


# -- report ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadError:
    """One malformed input record. `line` is 1-based (the row for parquet), or None."""

    file: str
    line: int | None
    kind: str  # "decode" | "json" | "not_object" | "missing_text" | "text_type" | "io"
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class ReadReport:
    """What the readers read and what they could not. Picklable; `merge` adds another one
    (from a worker process) into this one."""

    max_errors: int = 1000  # errors kept with their details; counts are always exact
    errors: list[ReadError] = field(default_factory=list)
    num_errors: int = 0
    num_docs: int = 0
    error_counts: Counter = field(default_factory=Counter)  # kind -> n
    errors_per_file: Counter = field(default_factory=Counter)  # file -> n
    docs_per_file: Counter = field(default_factory=Counter)  # file -> n
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), not read

    def add_error(self, file: str, line: int | None, kind: str, message: str) -> None:
        err = ReadError(str(file), line, kind, message)
        self.num_errors += 1
        self.error_counts[kind] += 1
        self.errors_per_file[err.file] += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(err)
        n = self.errors_per_file[err.file]
        if n <= _LOG_PER_FILE:
            logger.warning("skipped malformed input: %s", err)
        elif n == _LOG_PER_FILE + 1:
            logger.warning("%s: more malformed records; further ones are counted, not logged",
                           err.file)

    def add_doc(self, file: str) -> None:
        self.num_docs += 1
        self.docs_per_file[str(file)] += 1

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append((str(file), reason))

    def merge(self, other: ReadReport) -> ReadReport:
        self.num_errors += other.num_errors
        self.num_docs += other.num_docs
        self.error_counts.update(other.error_counts)
        self.errors_per_file.update(other.errors_per_file)
        self.docs_per_file.update(other.docs_per_file)
        room = max(0, self.max_errors - len(self.errors))
        self.errors.extend(other.errors[:room])
        self.skipped.extend(other.skipped)
        return self

    def to_dict(self) -> dict:
        return {
            "num_docs": self.num_docs,
            "num_errors": self.num_errors,
            "error_counts": dict(self.error_counts),
            "errors_per_file": dict(self.errors_per_file),
            "docs_per_file": dict(self.docs_per_file),
            "errors": [vars(e) for e in self.errors],
            "skipped": [list(s) for s in self.skipped],
        }

    def summary(self) -> str:
        s = f"{self.num_docs} documents read, {self.num_errors} malformed records skipped"
        if self.error_counts:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.error_counts.items())) + ")"
        if self.skipped:
            s += f", {len(self.skipped)} files not read"
        return s

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  {e}" for e in self.errors[:20]]
        if self.num_errors > 20:
            lines.append(f"  ... {self.num_errors - 20} more")
        return "\n".join(lines)


def stable_id(source: str, locator: object) -> str:
    """24 hex digits: BLAKE2b of the source name and where in it the document was."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{source}\x1f{locator}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# -- file kinds and opening -----------------------------------------------------------------

def _split_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for c in COMPRESSIONS:
        if low.endswith(c):
            return low[: -len(c)], c
    return low, None


def file_kind(path: str | os.PathLike) -> str | None:
    """"jsonl", "parquet", "text" or None (unknown) from a file name."""
    stem, comp = _split_compression(os.fspath(path))
    if stem.endswith(JSONL_EXTS):
        return "jsonl"
    if stem.endswith(TEXT_EXTS):
        return "text"
    if stem.endswith(PARQUET_EXTS) and comp is None:
        return "parquet"
    return None


def _open_binary(path: str) -> io.BufferedIOBase:
    """A binary stream of the file's decompressed bytes."""
    _, comp = _split_compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(f"{path}: reading .zst files needs the 'zstandard' package "
                              "(pip install zstandard, or the 'data' extra)") from e
        raw = open(path, "rb")  # noqa: SIM115 (closed by the stream reader)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


# -- jsonl ----------------------------------------------------------------------------------

def _parse_line(raw: bytes, file: str, lineno: int, text_key: str,
                report: ReadReport) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.add_error(file, lineno, "decode", f"invalid UTF-8 at byte {e.start}")
        return None
    if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        report.add_error(file, lineno, "json", f"invalid JSON: {e.msg} (column {e.colno})")
        return None
    if not isinstance(obj, dict):
        report.add_error(file, lineno, "not_object", f"a JSON {type(obj).__name__}, not an object")
        return None
    return _check_text(obj, file, lineno, text_key, report, escaped=b"\\u" in raw)


def _check_text(obj: dict, file: str, lineno: int | None, text_key: str, report: ReadReport,
                escaped: bool = True) -> dict | None:
    if text_key not in obj:
        report.add_error(file, lineno, "missing_text", f"no {text_key!r} field "
                         f"(keys: {sorted(map(str, obj))[:8]})")
        return None
    text = obj[text_key]
    if not isinstance(text, str):
        report.add_error(file, lineno, "text_type",
                         f"{text_key!r} is a {type(text).__name__}, not a string")
        return None
    if escaped:  # JSON \ud800-style escapes can smuggle in lone surrogates
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            report.add_error(file, lineno, "decode", f"lone surrogate in text at {e.start}")
            return None
    if text_key != "text":
        obj = dict(obj)
        del obj[text_key]
        obj["text"] = text
    return obj


def _finish(doc: dict, source: str, locator: object, file: str, report: ReadReport) -> dict:
    doc.setdefault("source", source)
    if doc.get("id") in (None, ""):
        doc["id"] = stable_id(source, locator)
    elif not isinstance(doc["id"], str):
        doc["id"] = str(doc["id"])
    report.add_doc(file)
    return doc


def _iter_lines(f, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines of an open binary file whose first byte is in [start, end)."""
    pos = 0
    if start > 0:
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())  # the rest of the line holding byte start-1
    for raw in f:
        if end is not None and pos >= end:
            break
        yield pos, raw
        pos += len(raw)


def count_lines_before(path: str | os.PathLike, offset: int, chunk: int = 1 << 24) -> int:
    """Newlines in the first `offset` bytes of an (uncompressed) file."""
    with open(path, "rb") as f:
        return _count_newlines(f, offset, chunk)


def iter_jsonl(path: str | os.PathLike, text_key: str = "text", report: ReadReport | None = None,
               start: int = 0, end: int | None = None, first_line: int | None = None,
               source: str | None = None) -> Iterator[dict]:
    """Documents of a jsonl file (.gz/.zst allowed). With `start`/`end` (uncompressed files
    only): the lines whose first byte lies in [start, end), so byte ranges that tile the file
    read every line exactly once. `first_line` is the 1-based number of the first line of the
    range (counted when not given, to keep ids and error locations exact)."""
    file = os.fspath(path)
    source = file if source is None else source
    report = ReadReport() if report is None else report
    ranged = start > 0 or end is not None
    if ranged and _split_compression(file)[1] is not None:
        raise ValueError(f"{file}: byte ranges need an uncompressed file")
    if first_line is None:
        first_line = 1 if start <= 0 else 2 + count_lines_before(file, start - 1)
    lineno = first_line - 1
    with _open_binary(file) as f:
        lines = _iter_lines(f, start, end) if ranged else ((0, r) for r in f)
        while True:
            try:
                _, raw = next(lines)
            except StopIteration:
                break
            except _read_errors() as e:  # truncated or corrupt compressed stream
                report.add_error(file, lineno + 1, "io", f"unreadable from here on: {e}")
                break
            lineno += 1
            doc = _parse_line(raw, file, lineno, text_key, report)
            if doc is not None:
                yield _finish(doc, source, lineno, file, report)


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


# -- parquet --------------------------------------------------------------------------------

def iter_parquet(path: str | os.PathLike, text_key: str = "text",
                 report: ReadReport | None = None, batch_size: int = 1024,
                 source: str | None = None) -> Iterator[dict]:
    """Documents of a parquet file, one per row; `line` in errors is the 1-based row."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs the 'pyarrow' package "
                          "(pip install pyarrow, or the 'data' extra)") from e
    file = os.fspath(path)
    source = file if source is None else source
    report = ReadReport() if report is None else report
    row = 0

    def rows() -> Iterator[dict]:
        pf = pq.ParquetFile(file)
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()

    it = rows()
    while True:
        try:
            obj = next(it)
        except StopIteration:
            break
        except (OSError, pa.ArrowException) as e:  # not parquet, truncated, corrupt
            report.add_error(file, row + 1, "io", f"parquet unreadable from here on: {e}")
            break
        row += 1
        doc = _check_text(obj, file, row, text_key, report)
        if doc is not None:
            yield _finish(doc, source, row, file, report)


# -- plain text -----------------------------------------------------------------------------

def iter_text(path: str | os.PathLike, report: ReadReport | None = None,
              paragraphs: bool = False, source: str | None = None) -> Iterator[dict]:
    """One document per file, or (paragraphs=True) per blank-line-separated paragraph, whose
    id locator and error line is the paragraph's first line. Undecodable files/paragraphs are
    reported, not read."""
    file = os.fspath(path)
    source = file if source is None else source
    report = ReadReport() if report is None else report
    try:
        with _open_binary(file) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        report.add_error(file, None, "io", f"unreadable: {e}")
        return
    if not paragraphs:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            report.add_error(file, line, "decode", f"invalid UTF-8 at byte {e.start}")
            return
        text = text.removeprefix("\ufeff")
        if text.strip():
            yield _finish({"text": text}, source, 0, file, report)
        return
    para: list[bytes] = []
    first = 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        if raw.strip():
            if not para:
                first = lineno
            para.append(raw)
            continue
        if para:
            yield from _text_paragraph(para, file, first, source, report)
            para = []
    if para:
        yield from _text_paragraph(para, file, first, source, report)


def _text_paragraph(lines: list[bytes], file: str, first: int, source: str,
                    report: ReadReport) -> Iterator[dict]:
    try:
        text = b"".join(lines).decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as e:
        report.add_error(file, first, "decode", f"invalid UTF-8 in the paragraph at byte {e.start}")
        return
    yield _finish({"text": text}, source, first, file, report)


# -- code repositories ----------------------------------------------------------------------

def read_code_repository(folder: str | os.PathLike, repo: str | None = None,
                         max_bytes: int = 1_000_000, report: ReadReport | None = None,
                         source: str | None = None) -> Iterator[dict]:
    """One document per source file of a repository: `{"id", "text", "path" (relative,
    posix), "repo", "lang": "code", "code_lang", "source"}`, in sorted path order. Skips
    hidden and vendored folders (node_modules, vendor, third_party, ...), symlinks, binaries,
    files over `max_bytes` and files of no known language (see `internlm2.data.code`);
    ordering a repository's files by dependencies is `internlm2.data.code`'s job."""
    from internlm2.data.code import language_of, read_repository

    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"code repository is not a folder: {root}")
    repo = repo or root.resolve().name
    source = os.fspath(folder) if source is None else source
    report = ReadReport() if report is None else report
    for rel, text in read_repository(root, max_bytes=max_bytes).items():
        doc = {"text": text, "path": rel, "repo": repo, "lang": "code",
               "code_lang": language_of(rel)}
        yield _finish(doc, source, rel, os.path.join(source, rel), report)


# -- Hugging Face datasets ------------------------------------------------------------------

def parse_hf_name(spec: str) -> tuple[str, str]:
    """"hf:owner/name[:split]" -> (owner/name, split); the split defaults to "train"."""
    body = spec.removeprefix("hf:")
    name, _, split = body.partition(":")
    if not name:
        raise ValueError(f"expected hf:owner/name[:split], got {spec!r}")
    return name, split or "train"


def read_hf_dataset(spec: str, text_key: str = "text", report: ReadReport | None = None,
                    streaming: bool = True) -> Iterator[dict]:
    """Documents of a Hugging Face dataset (`hf:owner/name[:split]`), streamed. Needs the
    `datasets` package and a reachable hub (or its local cache): a clear error otherwise."""
    name, split = parse_hf_name(spec)
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec}: reading a Hugging Face dataset needs the 'datasets' package "
                          "(pip install datasets) and access to the hub") from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, gated: datasets raises many kinds
        raise ConnectionError(f"could not load the Hugging Face dataset {name!r} (split "
                              f"{split!r}): {type(e).__name__}: {e}. The hub must be reachable, "
                              "or the dataset cached (HF_DATASETS_OFFLINE=1).") from e
    report = ReadReport() if report is None else report
    source = f"hf:{name}:{split}"
    for row, obj in enumerate(ds, 1):
        doc = _check_text(dict(obj), source, row, text_key, report)
        if doc is not None:
            yield _finish(doc, source, row, source, report)


# -- inputs, folders and shards -------------------------------------------------------------

@dataclass(frozen=True)
class InputPart:
    """One unit of reading work: a whole input (file, folder, repository, dataset) or a byte
    range [start, end) of an uncompressed jsonl file whose first line is `first_line`."""

    path: str
    kind: str  # "jsonl" | "parquet" | "text" | "code" | "hf"
    start: int = 0
    end: int | None = None
    first_line: int | None = None
    size: int = 0


def _is_repository(path: Path) -> bool:
    return (path / ".git").exists()


def expand_inputs(inputs, report: ReadReport | None = None) -> list[InputPart]:
    """Inputs as a flat list of parts: folders walked recursively (sorted; hidden entries
    skipped; files of unknown type recorded in `report.skipped`), prefixes resolved.
    Raises FileNotFoundError for a missing path and ValueError for an unknown file type."""
    if isinstance(inputs, (str, os.PathLike, InputPart)):
        inputs = [inputs]
    parts: list[InputPart] = []
    for item in inputs:
        if isinstance(item, InputPart):
            parts.append(item)
            continue
        spec = os.fspath(item)
        if spec.startswith("hf:"):
            parts.append(InputPart(spec, "hf"))
            continue
        force_code = spec.startswith(("code:", "repo:"))
        path = Path(spec[5:] if force_code else spec)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_dir() and (force_code or _is_repository(path)):
            parts.append(InputPart(os.fspath(path), "code"))
        elif force_code:
            raise NotADirectoryError(f"{spec}: a code repository must be a folder")
        elif path.is_dir():
            parts.extend(_walk_folder(path, report))
        else:
            kind = file_kind(path)
            if kind is None:
                raise ValueError(f"{path}: unknown input type (expected .jsonl, .ndjson, "
                                 ".parquet, .txt or .md, optionally .gz/.zst)")
            parts.append(InputPart(os.fspath(path), kind, size=path.stat().st_size))
    return parts


def _walk_folder(root: Path, report: ReadReport | None) -> list[InputPart]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name.startswith("."):
                continue
            kind = file_kind(name)
            if kind is None:
                if report is not None:
                    report.skip(full, "unknown file type")
                continue
            out.append(InputPart(full, kind, size=os.path.getsize(full)))
    return out


def read_documents(inputs, text_key: str = "text", *, report: ReadReport | None = None,
                   paragraphs: bool = False, max_code_bytes: int = 1_000_000,
                   hf_streaming: bool = True) -> Iterator[dict]:
    """Documents of every input, in order (see the module docstring for the inputs).

    `text_key` names the text field of jsonl/parquet/Hugging Face records (moved to "text").
    `paragraphs=True` splits text files at blank lines. Malformed records are recorded in
    `report` (a fresh one, logged, when not given) and skipped.
    """
    report = ReadReport() if report is None else report
    before = report.num_errors
    for part in expand_inputs(inputs, report):
        yield from read_part(part, text_key, report=report, paragraphs=paragraphs,
                             max_code_bytes=max_code_bytes, hf_streaming=hf_streaming)
    if report.num_errors > before:
        logger.warning("read_documents: %d malformed records skipped; so far: %s",
                       report.num_errors - before, report.summary())


def read_part(part: InputPart, text_key: str = "text", *, report: ReadReport | None = None,
              paragraphs: bool = False, max_code_bytes: int = 1_000_000,
              hf_streaming: bool = True) -> Iterator[dict]:
    """Documents of one `InputPart` (what a worker of a process pool reads)."""
    report = ReadReport() if report is None else report
    if part.kind == "jsonl":
        if part.start or part.end is not None:
            return iter_jsonl(part.path, text_key, report, part.start, part.end, part.first_line)
        return iter_jsonl(part.path, text_key, report)
    if part.kind == "parquet":
        return iter_parquet(part.path, text_key, report)
    if part.kind == "text":
        return iter_text(part.path, report, paragraphs=paragraphs)
    if part.kind == "code":
        return read_code_repository(part.path, max_bytes=max_code_bytes, report=report)
    if part.kind == "hf":
        return read_hf_dataset(part.path, text_key, report, streaming=hf_streaming)
    raise ValueError(f"unknown input kind {part.kind!r} for {part.path}")


def _line_start_at_or_after(path: str, offset: int, size: int) -> int:
    """Offset of the first line starting at or after `offset` (size if none)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        pos = offset - 1 + len(f.readline())
    return min(pos, size)


def split_inputs(inputs, num_shards: int, report: ReadReport | None = None,
                 min_part_bytes: int = 1 << 20) -> list[list[InputPart]]:
    """`num_shards` lists of parts of about equal bytes that, read in order one after the
    other, give exactly the documents (and ids) of `read_documents(inputs)`: shards are
    contiguous. Uncompressed jsonl files are cut at line boundaries (byte ranges, with their
    first line number counted); other inputs go whole to one shard. Some shards may be
    empty when there are fewer cuttable bytes than shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    parts = expand_inputs(inputs, report)
    total = sum(p.size for p in parts)
    target = max(total / num_shards, 1)
    shards: list[list[InputPart]] = [[] for _ in range(num_shards)]
    done = 0  # bytes assigned so far (of the whole inputs, in order)

    def shard_of(offset: float) -> int:
        return min(int(offset // target), num_shards - 1)

    for p in parts:
        cuttable = (p.kind == "jsonl" and _split_compression(p.path)[1] is None
                    and p.size >= 2 * min_part_bytes and num_shards > 1)
        if not cuttable:
            shards[shard_of(done)].append(p)
            done += p.size
            continue
        # cut at the global shard boundaries that fall inside this file
        cuts, k = [0], shard_of(done) + 1
        while k < num_shards and k * target < done + p.size:
            local = int(k * target - done)
            if min_part_bytes <= local <= p.size - min_part_bytes:
                cuts.append(_line_start_at_or_after(p.path, local, p.size))
            k += 1
        cuts.append(p.size)
        cuts = sorted(set(cuts))
        line, prev = 1, 0
        with open(p.path, "rb") as f:  # one pass to number the first line of each range
            for a, b in itertools.pairwise(cuts):
                if a > prev:
                    f.seek(prev)
                    line += _count_newlines(f, a - prev)
                    prev = a
                if a < b:
                    shards[shard_of(done + a)].append(
                        InputPart(p.path, "jsonl", a, b, line, b - a))
        done += p.size
    return shards


def _count_newlines(f, n: int, chunk: int = 1 << 24) -> int:
    count = 0
    while n > 0:
        buf = f.read(min(chunk, n))
        if not buf:
            break
        count += buf.count(b"\n")
        n -= len(buf)
    return count


def iter_jsonl_shards(path: str | os.PathLike, num_shards: int) -> list[InputPart]:
    """Byte ranges (cut at line starts) that tile one uncompressed jsonl file, for a process
    pool: each worker calls `read_part(part)`."""
    file = os.fspath(path)
    return [p for shard in split_inputs([file], num_shards, min_part_bytes=1) for p in shard]


def iter_texts(docs: Iterable[dict]) -> Iterator[str]:
    """The text of each document (e.g. to train a tokenizer from `read_documents`)."""
    for d in docs:
        yield d["text"]


__all__ = [
    "InputPart",
    "ReadError",
    "ReadReport",
    "count_lines_before",
    "expand_inputs",
    "file_kind",
    "iter_jsonl",
    "iter_jsonl_shards",
    "iter_parquet",
    "iter_text",
    "iter_texts",
    "parse_hf_name",
    "read_code_repository",
    "read_documents",
    "read_hf_dataset",
    "read_part",
    "split_inputs",
    "stable_id",
]
