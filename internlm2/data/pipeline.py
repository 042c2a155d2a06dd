"""The data pipeline runner (`internlm2 data run`): raw files to clean jsonl and token shards.

Stages, in order (report section 3.1); each per-document stage runs over `shards` shards:

  format     read the inputs (readers.py) and normalise them, identify the language (format.py)
  rules      Gopher / C4 / RefinedWeb rule filters per language (filters.RuleFilter)
  safety     domain and word blocklists, classifier hooks (filters.SafetyFilter)
  quality    advertisement / fluency classifier or rules (quality.QualityFilter)
  code       code quality levels: drop low, mark high for upsampling (code.CodeQualityFilter)
  code_repos files of a repository ordered by dependencies and concatenated into markdown
             documents (code.order_repository); files are grouped by repository across shards
  dedup      exact then MinHash near-duplicate removal, global over all shards (dedup.py);
             code is compared after `normalize_for_dedup`
  output     kept documents to clean/; the long-context selection (longctx.py) copies the
             documents fit for long-context training to long/ (they stay in clean/ too)
  tokenize   clean/ (high-quality code repeated) into token shards, when a tokenizer is given

Every shard of every stage is one call of `process_shard(ShardTask)`, run by a process pool
(`executor = "local"`) or as Ray tasks (`executor = "ray"`). A shard writes its outputs to
temporary names, renames them, and writes its done marker (its statistics) last, so a rerun
after a crash redoes only unfinished shards and gives the same output as an uninterrupted run.

On disk, under the output folder DIR:

  clean/part-NNNNN.jsonl           kept documents, every input field kept (id, source, ...)
                                   plus lang, lang_score, code_quality, upsample, ...
  removed/STAGE/part-NNNNN.jsonl   every removed document with "stage" and "reason";
                                   removed/read/ holds malformed input lines (file, line)
  long/part-NNNNN.jsonl            the long-context subset (copies of documents of clean/)
  shards/, shards_long/            token shards (shards.py format), when tokenizing
  stats.json, report.md            documents and bytes in/out per stage, reason, language
                                   and source; examples of removed documents
  .state/                          run fingerprint and per-shard done markers (kept)
  .work/                           intermediate files (deleted when the run completes)

Relative input paths are resolved against the current directory. A run folder belongs to
one configuration and one set of inputs; another one needs `overwrite=True` (--overwrite).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .readers import (
    ReadReport,
    expand_inputs,
    read_part,
    split_inputs,
    stable_id,
)

STATS_FORMAT = "internlm2-data-pipeline-stats"
_EXAMPLES_PER_REASON = 2
_EXAMPLES_PER_STAGE = 6
_EXAMPLE_CHARS = 240

# -- configuration ----------------------------------------------------------------------------

# Options of each stage table and their defaults. rules/safety/quality take their filter's own
# keys besides `enabled` (filters.RuleFilter, filters.SafetyFilter.from_config,
# quality.QualityFilter.from_config), which check them.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "format": {"form": "NFC", "fold_width": True, "max_blank_lines": 2, "lid_model": "",
               "strip_boilerplate": False},
    "rules": {"enabled": True},
    "safety": {"enabled": True},
    "quality": {"enabled": True},
    "code": {"enabled": True, "drop_low": True, "upsample_high": 2, "markdown": True,
             "concat_repositories": True, "repo_max_bytes": 1 << 20, "quality": {}},
    "dedup": {"enabled": True, "threshold": 0.7, "num_perm": 128, "ngram": 5, "seed": 0,
              "normalize_code": True, "skip_sources": []},
    "longctx": {"enabled": True, "min_bytes": 32768, "thresholds": {}, "ppl_model": "",
                "ppl_tokenizer": "", "ppl_min_gain": 0.02},
    "tokenize": {"tokenizer": "", "seq_len": 4096, "val_fraction": 0.01,
                 "shard_tokens": 1 << 26, "seed": 0, "upsample": True},
}
_SAFETY_KEYS = {"enabled", "domain_blocklist", "word_blocklist", "classifiers", "threshold",
                "check_code_words"}
_TOP_TABLES: dict[str, dict[str, Any]] = {
    "input": {"paths": [], "text_key": "text", "paragraphs": False, "max_code_bytes": 1_000_000},
    "output": {"dir": "", "keep_work": False},
    "run": {"executor": "local", "workers": 0, "shards": 8, "ray_address": "", "progress": True},
}
_TOP_FIELDS = {("input", "paths"): "inputs", ("output", "dir"): "output"}


def _default_stages() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(STAGE_DEFAULTS)


@dataclass
class PipelineConfig:
    """What to read, where to write, which stages with which options, how to run.

    `stages` maps a stage name to its options (see STAGE_DEFAULTS); a stage with
    `enabled = false` is skipped (format always runs; tokenize runs when `tokenizer` is set).
    `workers = 0` means one per CPU; `shards` fixes how the work is cut (the output does not
    depend on `workers` or `executor`)."""

    inputs: list[str] = field(default_factory=list)
    output: str = ""
    text_key: str = "text"
    paragraphs: bool = False
    max_code_bytes: int = 1_000_000
    executor: str = "local"
    workers: int = 0
    shards: int = 8
    ray_address: str = ""
    keep_work: bool = False
    progress: bool = True
    stages: dict[str, dict[str, Any]] = field(default_factory=_default_stages)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> PipelineConfig:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML: {e}") from e
        return cls.from_dict(data, origin=os.fspath(path))

    @classmethod
    def from_dict(cls, data: dict, origin: str = "<config>") -> PipelineConfig:
        """From the TOML layout: [input], [output], [run] and one table per stage."""
        cfg = cls()
        for table, values in data.items():
            if not isinstance(values, dict):
                raise ValueError(f"{origin}: '{table}' must be a table")
            if table in _TOP_TABLES:
                for key, value in values.items():
                    name = f"{table}.{key}"
                    if key not in _TOP_TABLES[table]:
                        raise ValueError(f"{origin}: unknown key '{name}' (known in [{table}]: "
                                         f"{', '.join(_TOP_TABLES[table])})")
                    _check_type(origin, name, value, _TOP_TABLES[table][key])
                    setattr(cfg, _TOP_FIELDS.get((table, key), key), copy.deepcopy(value))
            elif table in STAGE_DEFAULTS:
                cfg.stages[table] = _stage_options(origin, table, values)
            else:
                raise ValueError(f"{origin}: unknown table '[{table}]' (known: "
                                 f"{', '.join([*_TOP_TABLES, *STAGE_DEFAULTS])})")
        cfg.validate(origin)
        return cfg

    def stage(self, name: str) -> dict[str, Any] | None:
        """The options of a stage when it runs, else None."""
        opts = self.stages[name]
        if name == "tokenize":
            return opts if opts.get("tokenizer") else None
        return opts if opts.get("enabled", True) else None

    def validate(self, origin: str = "<config>") -> None:
        """Check values and build every enabled stage once, so bad options fail before work."""
        if self.executor not in ("local", "ray"):
            raise ValueError(f"{origin}: run.executor must be 'local' or 'ray', got "
                             f"{self.executor!r}")
        if self.shards < 1 or self.workers < 0:
            raise ValueError(f"{origin}: run.shards must be >= 1 and run.workers >= 0")
        for name in STAGE_DEFAULTS:
            self.stages[name] = _stage_options(origin, name, self.stages.get(name, {}))
            opts = self.stage(name)
            if opts is not None and name in _BUILDERS:
                try:
                    _BUILDERS[name](opts)
                except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
                    raise ValueError(f"{origin}: [{name}]: {e}") from e
        tok = self.stage("tokenize")
        if tok is not None and not os.path.exists(tok["tokenizer"]):
            raise FileNotFoundError(f"{origin}: tokenize.tokenizer: no such file or folder: "
                                    f"{tok['tokenizer']}")

    def fingerprint(self) -> dict:
        """What determines the outputs (not workers, executor, progress, tokenization)."""
        return {"inputs": _input_signature(self.inputs), "text_key": self.text_key,
                "paragraphs": self.paragraphs, "max_code_bytes": self.max_code_bytes,
                "shards": self.shards,
                "stages": {k: v for k, v in self.stages.items() if k != "tokenize"}}


def _check_type(origin: str, name: str, value, default) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (isinstance(default, float) or isinstance(value, int))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                list: "a list", dict: "a table"}[type(default)]
        raise ValueError(f"{origin}: '{name}' must be {kind}, got {value!r}")


def _stage_options(origin: str, stage: str, values: dict) -> dict:
    opts = copy.deepcopy(STAGE_DEFAULTS[stage])
    known = _SAFETY_KEYS if stage == "safety" else set(opts)
    for key, value in values.items():
        if stage in ("rules", "quality") and key not in opts:
            opts[key] = copy.deepcopy(value)  # checked by the filter itself in validate()
            continue
        if key not in known:
            raise ValueError(f"{origin}: unknown key '{stage}.{key}' (known in [{stage}]: "
                             f"{', '.join(sorted(known))})")
        if key in opts:
            _check_type(origin, f"{stage}.{key}", value, opts[key])
        opts[key] = copy.deepcopy(value)
    return opts


def _resolve_inputs(inputs: list[str]) -> list[str]:
    """Globs expanded (sorted), paths made absolute (workers may run elsewhere)."""
    out = []
    for spec in inputs:
        spec = os.fspath(spec)
        if spec.startswith("hf:"):
            out.append(spec)
            continue
        prefix = next((p for p in ("code:", "repo:") if spec.startswith(p)), "")
        path = spec[len(prefix):]
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no input matches {spec!r}")
            out += [prefix + os.path.abspath(m) for m in matches]
        else:
            out.append(prefix + os.path.abspath(path))
    return out


_PATH_OPTIONS = (("format", "lid_model"), ("quality", "model"), ("longctx", "ppl_model"),
                 ("longctx", "ppl_tokenizer"), ("tokenize", "tokenizer"),
                 ("safety", "domain_blocklist"))


def _absolute_paths(stages: dict[str, dict]) -> dict[str, dict]:
    """Stage options with file paths made absolute (Ray workers may have another cwd)."""
    stages = copy.deepcopy(stages)

    def fix(v):
        return os.path.abspath(v) if isinstance(v, str) and v and os.path.exists(v) else v

    for stage, key in _PATH_OPTIONS:
        if key in stages[stage]:
            stages[stage][key] = fix(stages[stage][key])
    words = stages["safety"].get("word_blocklist")
    if isinstance(words, dict):
        stages["safety"]["word_blocklist"] = {k: fix(v) for k, v in words.items()}
    return stages


def _input_signature(inputs: list[str]) -> list:
    sig = []
    for part in expand_inputs(_resolve_inputs(inputs)):
        st = os.stat(part.path) if part.kind not in ("hf", "code") else None
        sig.append([part.path, part.kind, st.st_size if st else 0, st.st_mtime_ns if st else 0])
    return sig


# -- stage objects (built once per process) ---------------------------------------------------

def _build_rules(o: dict):
    from .filters import RuleFilter
    return RuleFilter({k: v for k, v in o.items() if k != "enabled"})


def _build_safety(o: dict):
    from .filters import SafetyFilter
    return SafetyFilter.from_config({k: v for k, v in o.items() if k != "enabled"})


def _build_quality(o: dict):
    from .quality import QualityFilter
    return QualityFilter.from_config({k: v for k, v in o.items() if k != "enabled"})


def _build_code(o: dict):
    from .code import CodeQualityConfig, CodeQualityFilter
    return CodeQualityFilter(CodeQualityConfig(**o["quality"]), high_repeat=o["upsample_high"])


def _build_longctx(o: dict):
    import dataclasses

    from .longctx import LongContextConfig, LongContextSelector
    cfg = LongContextConfig(min_bytes=o["min_bytes"])
    for lang, over in o["thresholds"].items():
        base = cfg.thresholds.get(lang) or cfg.thresholds["other"]
        cfg.thresholds[lang] = dataclasses.replace(base, **over)
    ppl = None
    if o["ppl_model"]:
        from internlm2.hf import load_model
        from internlm2.tokenizer import load_tokenizer

        from .longctx import PerplexityDiffFilter
        model = load_model(o["ppl_model"]).eval()
        tok = load_tokenizer(o["ppl_tokenizer"] or o["ppl_model"])
        ppl = PerplexityDiffFilter(model, tok, min_gain=o["ppl_min_gain"])
    return LongContextSelector(cfg), ppl


def _build_format(o: dict):
    from .format import load_lid_model
    return load_lid_model(o["lid_model"]) if o["lid_model"] else None


_BUILDERS: dict[str, Callable[[dict], Any]] = {
    "format": _build_format, "rules": _build_rules, "safety": _build_safety,
    "quality": _build_quality, "code": _build_code, "longctx": _build_longctx}
_CACHE: dict[tuple[str, str], Any] = {}


def _stage_object(stage: str, opts: dict):
    key = (stage, json.dumps(opts, sort_keys=True, default=str))
    if key not in _CACHE:
        _CACHE[key] = _BUILDERS[stage](opts)
    return _CACHE[key]


# -- files ------------------------------------------------------------------------------------

def _part(k: int) -> str:
    return f"part-{k:05d}.jsonl"


class _Writer:
    """jsonl lines to a temporary name, renamed to `path` on a clean exit; when nothing is
    written (and `lazy`) no file is made."""

    def __init__(self, path: Path, lazy: bool = True):
        self.path, self.n, self._f = Path(path), 0, None
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        if not lazy:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, doc: dict) -> None:
        if self._f is None:
            self._open()
        self._f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.n += 1

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._f is None:
            return
        self._f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- statistics -------------------------------------------------------------------------------

def reason_key(reason: str) -> str:
    """The category of a reason: "gopher_repetition: dup_line_frac=0.42 > 0.30" ->
    "gopher_repetition", "near-duplicate of 1a2b (jaccard~0.83)" -> "near-duplicate"."""
    head = reason.split(":", 1)[0].strip()
    return re.sub(r"\s+of\s+\S+.*$", "", head)


def _nbytes(doc: dict) -> int:
    return len((doc.get("text") or "").encode("utf-8", "surrogatepass"))


class _Stats:
    """Documents and bytes in / out / removed of one shard of a stage, per reason, language
    and source, plus a few removed examples."""

    def __init__(self):
        self.d: dict[str, Any] = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
                                  "docs_removed": 0, "bytes_removed": 0, "removed": {},
                                  "by_lang": {}, "by_source": {}, "examples": []}

    def _add(self, doc: dict, what: str, n: int) -> None:
        self.d[f"docs_{what}"] += 1
        self.d[f"bytes_{what}"] += n
        for key, g in (("by_lang", doc.get("lang")), ("by_source", doc.get("source"))):
            e = self.d[key].setdefault(str(g or "unknown"), {})
            e[f"docs_{what}"] = e.get(f"docs_{what}", 0) + 1
            e[f"bytes_{what}"] = e.get(f"bytes_{what}", 0) + n

    def seen(self, doc: dict, nbytes: int | None = None) -> None:
        self._add(doc, "in", _nbytes(doc) if nbytes is None else nbytes)

    def kept(self, doc: dict) -> None:
        self._add(doc, "out", _nbytes(doc))

    def removed(self, doc: dict, reason: str) -> None:
        n = _nbytes(doc)
        self._add(doc, "removed", n)
        key = reason_key(reason)
        e = self.d["removed"].setdefault(key, {"docs": 0, "bytes": 0})
        e["docs"] += 1
        e["bytes"] += n
        if e["docs"] <= _EXAMPLES_PER_REASON:
            self.d["examples"].append(_example(doc, reason))


def _example(doc: dict, reason: str) -> dict:
    text = doc.get("text") or ""
    return {"id": doc.get("id"), "source": doc.get("source"), "lang": doc.get("lang"),
            "reason": reason, "text": text[:_EXAMPLE_CHARS] + ("…" if len(text) > _EXAMPLE_CHARS
                                                               else "")}


def _merge(a, b):
    """Sum of two statistics trees (numbers added, dicts merged, lists concatenated)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return b


def _aggregate(results: list[dict]) -> dict:
    total: dict = {}
    for r in results:
        total = _merge(total, r)
    if "examples" in total:  # a few per reason, in shard order
        seen: dict[str, int] = {}
        keep = []
        for ex in total["examples"]:
            key = reason_key(ex["reason"])
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= _EXAMPLES_PER_REASON and len(keep) < _EXAMPLES_PER_STAGE:
                keep.append(ex)
        total["examples"] = keep
    return total


# -- per-shard work ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardTask:
    """One shard of one stage: what `process_shard` needs, picklable (process pool, Ray)."""

    stage: str
    shard: int
    root: str                   # the run folder (absolute)
    inputs: tuple = ()          # InputParts (format) or jsonl paths, read in order
    options: dict = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        return Path(self.root) / ".state" / self.stage / f"part-{self.shard:05d}.json"

    def work(self, stage: str | None = None) -> Path:
        return Path(self.root) / ".work" / (stage or self.stage) / _part(self.shard)

    def removed(self, stage: str | None = None) -> Path:
        return Path(self.root) / "removed" / (stage or self.stage) / _part(self.shard)


def process_shard(task: ShardTask) -> dict:
    """Run one shard of a stage and write its done marker (its statistics) last."""
    result = _SHARD_FUNCTIONS[task.stage](task)
    _write_json(task.marker, result)
    return result


def _docs(task: ShardTask) -> Iterator[dict]:
    for path in task.inputs:
        yield from _read_jsonl(Path(path))


class _StreamingReport(ReadReport):
    """A ReadReport that also writes every malformed record to removed/read/."""

    def __init__(self, writer: _Writer):
        super().__init__(max_errors=20)
        self.writer = writer

    def add_error(self, file: str, line: int | None, kind: str, message: str) -> None:
        super().add_error(file, line, kind, message)
        self.writer.write({"stage": "read", "reason": f"{kind}: {message}", "file": str(file),
                           "line": line})


def _format_shard(task: ShardTask) -> dict:
    from .filters import strip_boilerplate_lines
    from .format import format_document

    o = task.options
    fmt = o["format"]
    lid = _stage_object("format", fmt)
    norm = {k: fmt[k] for k in ("form", "fold_width", "max_blank_lines")}
    st = _Stats()
    with _Writer(task.work()) as out, _Writer(task.removed()) as rm, \
            _Writer(task.removed("read")) as bad:
        report = _StreamingReport(bad)
        for part in task.inputs:
            for raw in read_part(part, o["text_key"], report=report, paragraphs=o["paragraphs"],
                                 max_code_bytes=o["max_code_bytes"]):
                nbytes = _nbytes(raw)
                doc = format_document(raw, lid=lid, **norm)
                if fmt["strip_boilerplate"] and doc["lang"] != "code":
                    doc["text"], dropped = strip_boilerplate_lines(doc["text"])
                    if dropped:
                        doc["boilerplate_lines"] = dropped
                st.seen(doc, nbytes)
                if doc["text"].strip():
                    out.write(doc)
                    st.kept(doc)
                else:
                    reason = "format_empty: no text left after normalisation"
                    rm.write({**doc, "stage": "format", "reason": reason})
                    st.removed(doc, reason)
    read = {"docs": report.num_docs, "malformed": report.num_errors,
            "error_counts": dict(report.error_counts),
            "errors_per_file": dict(report.errors_per_file),
            "errors": [vars(e) for e in report.errors]}
    return {**st.d, "read": read}


def _filter_shard(task: ShardTask) -> dict:
    check = _stage_object(task.stage, task.options).check
    st = _Stats()
    with _Writer(task.work()) as out, _Writer(task.removed()) as rm:
        for doc in _docs(task):
            st.seen(doc)
            reason = check(doc)
            if reason:
                rm.write({**doc, "stage": task.stage, "reason": reason})
                st.removed(doc, reason)
            else:
                out.write(doc)
                st.kept(doc)
    return st.d


def _bucket(repo: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(repo.encode(), digest_size=8).digest(), "little") % n


def _code_shard(task: ShardTask) -> dict:
    """Score code files: low ones removed, the rest annotated; files of a repository go to
    the bucket of their repository (a file per bucket), other documents pass through."""
    from .code import to_markdown

    o = task.options
    cq = _stage_object("code", o)
    nb = o["buckets"]
    st = _Stats()
    levels: dict[str, int] = {}
    buckets: dict[int, _Writer] = {}
    try:
        with _Writer(task.work()) as out, _Writer(task.removed()) as rm:
            for doc in _docs(task):
                st.seen(doc)
                # every document has its lang after format; CodeQualityFilter.applies would
                # also take prose that carries a source-file path (docstrings of a module)
                if doc.get("lang") != "code":
                    out.write(doc)
                    st.kept(doc)
                    continue
                score, level, signals = cq.score(doc)
                levels[level] = levels.get(level, 0) + 1
                if level == "low" and o["drop_low"]:
                    reason = f"code_quality_low: {'; '.join(signals)}"
                    rm.write({**doc, "stage": "code", "reason": reason})
                    st.removed(doc, reason)
                    continue
                doc["code_quality"] = {"score": score, "level": level, "signals": signals}
                doc["upsample"] = cq.upsample_factor(level)
                if o["concat_repositories"] and doc.get("repo") and doc.get("path"):
                    b = _bucket(str(doc["repo"]), nb)
                    if b not in buckets:
                        buckets[b] = _Writer(task.work().with_suffix(f".repos-{b:05d}.jsonl"))
                    buckets[b].write(doc)
                else:
                    if o["markdown"] and doc.get("path"):
                        doc["text"] = to_markdown(str(doc["path"]), doc["text"])
                    out.write(doc)
                st.kept(doc)
        for w in buckets.values():
            w.__exit__(None)
    except BaseException:
        for w in buckets.values():
            w.__exit__(Exception)
        raise
    return {**st.d, "levels": levels,
            "buckets": {str(b): str(w.path) for b, w in sorted(buckets.items())}}


def _repo_documents(repo: str, files: list[dict], o: dict, cutoffs) -> list[dict]:
    """One markdown document per run of files (in dependency order) of at most
    `repo_max_bytes`; quality is the byte-weighted mean of the files' scores."""
    from .code import concat_repository, order_repository, to_markdown

    by_path = {str(d["path"]).replace("\\", "/"): d for d in files}
    order = order_repository({p: d["text"] for p, d in by_path.items()})
    chunks: list[list[str]] = [[]]
    size = 0
    for p in order:
        n = _nbytes(by_path[p])
        if chunks[-1] and size + n > o["repo_max_bytes"]:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += n
    docs = []
    for i, paths in enumerate(chunks):
        name = repo if len(chunks) == 1 else f"{repo} (part {i + 1} of {len(chunks)})"
        members = [by_path[p] for p in paths]
        if len(chunks) == 1:
            text = concat_repository(repo, {p: by_path[p]["text"] for p in paths})
        else:
            text = f"# Repository: {name}\n\n" + "\n".join(
                to_markdown(p, by_path[p]["text"]) for p in paths)
        weight = [max(1, _nbytes(d)) for d in members]
        score = round(sum(w * d["code_quality"]["score"] for w, d in zip(weight, members))
                      / sum(weight), 4)
        high, low = cutoffs
        level = "high" if score >= high else "moderate" if score >= low else "low"
        counts: dict[str, int] = {}
        for d in members:
            counts[d["code_quality"]["level"]] = counts.get(d["code_quality"]["level"], 0) + 1
        docs.append({"id": stable_id(f"repo:{repo}", f"{i}:{paths[0]}"), "text": text,
                     "source": members[0].get("source"), "lang": "code", "repo": repo,
                     "part": i, "paths": paths, "merged_ids": [d["id"] for d in members],
                     "code_quality": {"score": score, "level": level, "files": counts},
                     "upsample": o["upsample_high"] if level == "high" else 1})
    return docs


def _code_repos_shard(task: ShardTask) -> dict:
    """Pass the shard's other documents through, then write the repositories of bucket
    `shard` (their files gathered from every shard) as concatenated documents."""
    o = task.options
    cq = _stage_object("code", {k: v for k, v in o.items() if k not in ("buckets", "passthrough")})
    cutoffs = (cq.config.high_cutoff, cq.config.low_cutoff)
    st = _Stats()
    merged = created = 0
    with _Writer(task.work()) as out, _Writer(task.removed()) as rm:
        for doc in _read_jsonl(Path(o["passthrough"])):
            st.seen(doc)
            out.write(doc)
            st.kept(doc)
        repos: dict[str, dict[str, dict]] = {}
        for doc in _docs(task):
            st.seen(doc)
            files = repos.setdefault(str(doc["repo"]), {})
            path = str(doc["path"]).replace("\\", "/")
            if path in files:
                reason = f"code_duplicate_path: {path} is already in repository {doc['repo']}"
                rm.write({**doc, "stage": "code_repos", "reason": reason})
                st.removed(doc, reason)
            else:
                files[path] = doc
        for repo in sorted(repos):
            docs = _repo_documents(repo, list(repos[repo].values()), o, cutoffs)
            merged += len(repos[repo])
            created += len(docs)
            for d in docs:
                out.write(d)
                st.kept(d)
    return {**st.d, "files_merged": merged, "repo_docs": created}


def _dedup_keys_shard(task: ShardTask) -> dict:
    """The text MinHash compares (code normalised for indentation), one line per document
    with its position in the shard; documents of `skip_sources` are left out."""
    from .code import normalize_for_dedup

    o = task.options
    skip = set(o["skip_sources"])
    n = 0
    with _Writer(task.work(), lazy=False) as out:
        for i, doc in enumerate(_docs(task)):
            if doc.get("source") in skip:
                continue
            text = doc["text"]
            if o["normalize_code"] and doc.get("lang") == "code":
                text = normalize_for_dedup(text)
            key = {"id": doc["id"], "_pos": [task.shard, i], "text": text}
            for k in ("dump", "date"):
                if doc.get(k) is not None:
                    key[k] = doc[k]
            out.write(key)
            n += 1
    return {"keys": n, "path": str(task.work())}


def _dedup_apply_shard(task: ShardTask) -> dict:
    decisions = {rec["i"]: rec for rec in _read_jsonl(Path(task.options["decisions"]))}
    st = _Stats()
    with _Writer(task.work()) as out, _Writer(task.removed()) as rm:
        for i, doc in enumerate(_docs(task)):
            st.seen(doc)
            dec = decisions.get(i)
            if dec is None:
                out.write(doc)
                st.kept(doc)
            else:
                rm.write({**doc, "stage": "dedup", "reason": dec["reason"],
                          "duplicate_of": dec["duplicate_of"], "jaccard": dec["jaccard"]})
                st.removed(doc, dec["reason"])
    return st.d


def _output_shard(task: ShardTask) -> dict:
    """Kept documents to clean/; those fit for long-context training also to long/."""
    o = task.options
    selector = ppl = None
    if o.get("longctx"):
        selector, ppl = _stage_object("longctx", o["longctx"])
    st = _Stats()
    source_docs = 0
    long = {"docs": 0, "bytes": 0, "candidates": 0, "rejected": {}, "by_lang": {}}
    root = Path(task.root)
    with _Writer(root / "clean" / _part(task.shard)) as out, \
            _Writer(root / "long" / _part(task.shard)) as lw:
        for doc in _docs(task):
            st.seen(doc)
            out.write(doc)
            st.kept(doc)
            source_docs += len(doc.get("merged_ids") or [doc])
            if selector is None:
                continue
            reason = selector.check(doc)
            if reason and reason.startswith("too_short"):
                continue
            long["candidates"] += 1
            if reason is None and ppl is not None:
                reason = ppl.check(doc)
            if reason:
                key = reason_key(reason)
                long["rejected"][key] = long["rejected"].get(key, 0) + 1
                continue
            lw.write(doc)
            n = _nbytes(doc)
            long["docs"] += 1
            long["bytes"] += n
            lang = str(doc.get("lang") or "unknown")
            e = long["by_lang"].setdefault(lang, {"docs": 0, "bytes": 0})
            e["docs"] += 1
            e["bytes"] += n
    return {**st.d, "source_docs": source_docs, "long": long}


_SHARD_FUNCTIONS: dict[str, Callable[[ShardTask], dict]] = {
    "format": _format_shard, "rules": _filter_shard, "safety": _filter_shard,
    "quality": _filter_shard, "code": _code_shard, "code_repos": _code_repos_shard,
    "dedup_keys": _dedup_keys_shard, "dedup": _dedup_apply_shard, "output": _output_shard}


# -- executors --------------------------------------------------------------------------------

class LocalExecutor:
    """Shards in a process pool (`workers` > 1), or one after the other in this process."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable, tasks: list, bar) -> list:
        if self.workers <= 1 or len(tasks) <= 1:
            out = []
            for t in tasks:
                out.append(fn(t))
                bar.update(1)
            return out
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers)
        futures = [self._pool.submit(fn, t) for t in tasks]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            bar.update(len(done))
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    wait(pending)  # running shards finish (and count as done next time)
                    raise f.exception()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """The same shard function as Ray tasks: a local Ray instance (`ray.init()`) when no
    address is given, else the cluster at `address` (inputs and the output folder must be
    on storage every node sees)."""

    def __init__(self, workers: int = 0, address: str = ""):
        try:
            import ray
        except ImportError as e:
            raise ImportError("--executor ray needs the 'ray' package: pip install "
                              "'internlm2[ray]' (or pip install ray)") from e
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address} if address else \
                {"num_cpus": workers or os.cpu_count() or 1}
            ray.init(include_dashboard=False, **kwargs)
            self._started = True
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable, tasks: list, bar) -> list:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        refs = [self._remote[fn].remote(t) for t in tasks]
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            self.ray.get(done)  # raises the task's error
            bar.update(len(done))
        return self.ray.get(refs)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(config: PipelineConfig):
    workers = config.workers or os.cpu_count() or 1
    if config.executor == "ray":
        return RayExecutor(config.workers, config.ray_address)
    return LocalExecutor(min(workers, config.shards))


# -- the runner -------------------------------------------------------------------------------

_OWNED = ("clean", "removed", "long", "shards", "shards_long", ".state", ".work", "stats.json",
          "report.md")


def _prepare(root: Path, config: PipelineConfig, overwrite: bool) -> None:
    fp = json.loads(json.dumps(config.fingerprint()))
    fp_file = root / ".state" / "run.json"
    if overwrite:
        for name in _OWNED:
            p = root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif fp_file.is_file():
        old = json.loads(fp_file.read_text(encoding="utf-8"))
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            if "stages" in diff:
                diff += [f"stages.{s}" for s in fp["stages"]
                         if old.get("stages", {}).get(s) != fp["stages"][s]]
            raise ValueError(f"{root} holds a pipeline run with other settings or inputs "
                             f"(differs in: {', '.join(diff)}); pass --overwrite or use "
                             "another output folder")
    elif any((root / n).exists() for n in _OWNED):
        raise ValueError(f"{root} holds pipeline outputs of unknown settings; pass --overwrite "
                         "or use another output folder")
    _write_json(fp_file, fp)


class _Runner:
    def __init__(self, config: PipelineConfig, executor):
        self.config, self.executor = config, executor
        self.root = Path(config.output).resolve()
        self.workers = config.workers or os.cpu_count() or 1
        self.timing: dict[str, float] = {}

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=f"{desc:<10}", unit="shard",
                    disable=not self.config.progress, dynamic_ncols=True)

    def run_map(self, stage: str, inputs: list[tuple], options: dict) -> list[dict]:
        """Every shard of a stage over `inputs` (one tuple of inputs per shard)."""
        return self.run_tasks(stage, [ShardTask(stage, k, str(self.root), tuple(inp), options)
                                      for k, inp in enumerate(inputs)])

    def run_tasks(self, stage: str, tasks: list[ShardTask]) -> list[dict]:
        """Run the tasks without a done marker; the statistics of all of them, in order."""
        t0 = time.perf_counter()
        todo = [t for t in tasks if not t.marker.is_file()]
        bar = self._bar(len(tasks), len(tasks) - len(todo), stage)
        try:
            if todo:
                self.executor.map(process_shard, todo, bar)
        finally:
            bar.close()
        self.timing[stage] = self.timing.get(stage, 0.0) + time.perf_counter() - t0
        return [json.loads(t.marker.read_text(encoding="utf-8")) for t in tasks]

    def outputs(self, stage: str) -> list[tuple]:
        return [(str(self.root / ".work" / stage / _part(k)),) for k in range(self.config.shards)]

    def dedup(self, prev: str, o: dict) -> tuple[list[dict], dict]:
        """Keys per shard, MinHash over all of them (one global step), removal per shard."""
        keys = self.run_map("dedup_keys", self.outputs(prev), o)
        marker = self.root / ".state" / "dedup_global.json"
        t0 = time.perf_counter()
        if not marker.is_file():
            _write_json(marker, self._dedup_global(keys, o))
        summary = json.loads(marker.read_text(encoding="utf-8"))
        self.timing["minhash"] = time.perf_counter() - t0
        work = self.root / ".work" / "dedup_decisions"
        tasks = [ShardTask("dedup", k, str(self.root), inp, {"decisions": str(work / _part(k))})
                 for k, inp in enumerate(self.outputs(prev))]
        return self.run_tasks("dedup", tasks), summary

    def _dedup_global(self, key_files: list[str], o: dict) -> dict:
        """MinHash over every shard's keys (dedup.dedup_files); its decisions split per shard."""
        from tqdm import tqdm

        from .dedup import dedup_files

        work = self.root / ".work" / "dedup_decisions"
        nkeys = sum(k["keys"] for k in key_files)
        summary: dict[str, Any] = {"docs": nkeys}
        out = self.root / ".work" / "dedup_global"
        with tqdm(total=1, desc=f"{'minhash':<10}", unit="step",
                  disable=not self.config.progress) as bar:
            if nkeys:  # dedup_files resumes by itself after a crash
                s = dedup_files([k["path"] for k in key_files], out, threshold=o["threshold"],
                                num_perm=o["num_perm"], ngram=o["ngram"], seed=o["seed"],
                                workers=self.workers, workdir=self.root / ".work" / "dedup_tmp")
                summary.update({k: s[k] for k in ("bands", "rows", "candidate_checks",
                                                  "confirmed_pairs", "clusters", "removed_by_reason")
                                if k in s})
            bar.update(1)
        writers = [_Writer(work / _part(k), lazy=False) for k in range(self.config.shards)]
        for rec in _read_jsonl(out / "removed.jsonl") if nkeys else ():
            k, i = rec["_pos"]
            writers[k].write({"i": i, "reason": rec["reason"], "duplicate_of": rec["duplicate_of"],
                              "jaccard": rec["jaccard"]})
        for w in writers:
            w.__exit__(None)
        return summary

    def tokenize(self, o: dict, long_docs: int) -> dict:
        from internlm2.tokenizer import load_tokenizer

        from .shards import pack, write_token_shards
        t0 = time.perf_counter()
        tok = load_tokenizer(o["tokenizer"])
        kw = dict(shard_tokens=o["shard_tokens"], val_fraction=o["val_fraction"], seed=o["seed"],
                  num_workers=self.workers if self.workers > 1 else 0,
                  progress=self.config.progress)
        out = {}
        for name, folder, upsample in (("main", "clean", o["upsample"]), ("long", "long", False)):
            if name == "long" and not long_docs:
                continue
            copies = [0]
            docs = iter_output_documents(self.root / folder, upsample, copies)
            dest = self.root / ("shards" if name == "main" else "shards_long")
            m = write_token_shards(docs, tok, dest, **kw)
            out[name] = {split: {"docs": m["splits"][split]["num_docs"],
                                 "tokens": m["splits"][split]["num_tokens"],
                                 "shards": len(m["splits"][split]["shards"])}
                         for split in ("train", "val")}
            out[name]["path"] = dest.name
            out[name]["upsampled_copies"] = copies[0]
        train = out["main"]["train"]
        if train["tokens"]:
            ds = pack(self.root / "shards", o["seq_len"], shuffle=False)
            out["packing"] = {"seq_len": o["seq_len"], "samples": len(ds),
                              "tokens": ds.num_tokens,
                              "padding_tokens": len(ds) * o["seq_len"] - ds.num_tokens}
        self.timing["tokenize"] = time.perf_counter() - t0
        return out


def iter_output_documents(folder: str | os.PathLike, upsample: bool = True,
                          copies: list[int] | None = None) -> Iterator[dict]:
    """The documents of an output folder (`clean/` or `long/`); with `upsample`,
    `doc["upsample"]` times each (the copies keep their id, so they fall in the same
    train/val split). `copies[0]` counts the extra copies."""
    copies = copies if copies is not None else [0]
    for path in sorted(Path(folder).glob("part-*.jsonl")):
        for doc in _read_jsonl(path):
            n = max(1, int(doc.get("upsample", 1))) if upsample else 1
            copies[0] += n - 1
            for _ in range(n):
                yield doc


def run_pipeline(config: PipelineConfig, overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline; write stats.json and report.md; return the statistics."""
    config = copy.deepcopy(config)
    config.validate()
    config.stages = _absolute_paths(config.stages)
    if not config.inputs:
        raise ValueError("no inputs: give [input] paths in the config or --input")
    if not config.output:
        raise ValueError("no output folder: give [output] dir in the config or --output")
    t_start = time.perf_counter()
    inputs = _resolve_inputs(config.inputs)
    root = Path(config.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _prepare(root, config, overwrite)
    executor = make_executor(config)
    try:
        run = _Runner(config, executor)
        driver_report = ReadReport()
        parts = split_inputs(inputs, config.shards, report=driver_report)
        stages: dict[str, dict] = {}
        fmt_opts = {"format": config.stages["format"], "text_key": config.text_key,
                    "paragraphs": config.paragraphs, "max_code_bytes": config.max_code_bytes}
        results = run.run_map("format", [tuple(p) for p in parts], fmt_opts)
        stages["format"] = _aggregate(results)
        read = _aggregate([r["read"] for r in results])
        read["skipped"] = [list(s) for s in driver_report.skipped]
        prev = "format"
        for name in ("rules", "safety", "quality"):
            o = config.stage(name)
            if o is not None:
                stages[name] = _aggregate(run.run_map(name, run.outputs(prev), o))
                prev = name
        extra: dict[str, Any] = {}
        o = config.stage("code")
        if o is not None:
            co = {**o, "buckets": config.shards}
            split = run.run_map("code", run.outputs(prev), co)
            stages["code"] = _aggregate(split)
            prev = "code"
            extra["code"] = {"levels": stages["code"].pop("levels", {})}
            stages["code"].pop("buckets", None)
            if o["concat_repositories"]:
                inputs_k = [tuple(r["buckets"][str(k)] for r in split if str(k) in r["buckets"])
                            for k in range(config.shards)]
                tasks = [ShardTask("code_repos", k, str(root), inputs_k[k],
                                   {**co, "passthrough": str(root / ".work" / "code" / _part(k))})
                         for k in range(config.shards)]
                stages["code_repos"] = _aggregate(run.run_tasks("code_repos", tasks))
                extra["code"]["files_merged"] = stages["code_repos"].get("files_merged", 0)
                extra["code"]["repo_docs"] = stages["code_repos"].get("repo_docs", 0)
                prev = "code_repos"
        o = config.stage("dedup")
        if o is not None:
            dstats, extra["dedup"] = run.dedup(prev, o)
            stages["dedup"] = _aggregate(dstats)
            prev = "dedup"
        out = _aggregate(run.run_map("output", run.outputs(prev),
                                     {"longctx": config.stage("longctx")}))
        stats = _assemble(config, inputs, read, stages, out, extra)
        tok = config.stage("tokenize")
        if tok is not None:
            stats["tokenize"] = run.tokenize(tok, stats["output"]["long"]["docs"])
        if not config.keep_work:
            shutil.rmtree(root / ".work", ignore_errors=True)
        run.timing["total"] = time.perf_counter() - t_start
        stats["timing"] = {k: round(v, 3) for k, v in run.timing.items()}
        _write_json(root / "stats.json", stats)
        tmp = root / "report.md.tmp"
        tmp.write_text(render_report(stats), encoding="utf-8")
        os.replace(tmp, root / "report.md")
        return stats
    finally:
        executor.close()


# -- statistics and report --------------------------------------------------------------------

_COUNTS = ("docs_in", "bytes_in", "docs_out", "bytes_out", "docs_removed", "bytes_removed")


def _assemble(config: PipelineConfig, inputs: list[str], read: dict, stages: dict[str, dict],
              out: dict, extra: dict) -> dict:
    stage_stats = {}
    for name, s in stages.items():
        entry = {k: s.get(k, 0) for k in _COUNTS}
        if name == "code_repos":
            entry["files_merged"] = s.get("files_merged", 0)
            entry["repo_docs"] = s.get("repo_docs", 0)
        entry.update(removed=s.get("removed", {}), by_lang=s.get("by_lang", {}),
                     by_source=s.get("by_source", {}), examples=s.get("examples", []))
        stage_stats[name] = entry
    removed = {"docs": sum(s["docs_removed"] for s in stage_stats.values()),
               "bytes": sum(s["bytes_removed"] for s in stage_stats.values())}
    docs, malformed = read.get("docs", 0), read.get("malformed", 0)
    kept = out.get("source_docs", 0)
    fmt = stage_stats["format"]
    return {
        "format": STATS_FORMAT, "version": 1,
        "inputs": {"paths": inputs, "records": docs + malformed, "documents": docs,
                   "malformed": malformed, "bytes": fmt["bytes_in"]},
        "read": {"malformed": malformed, "error_counts": read.get("error_counts", {}),
                 "errors_per_file": read.get("errors_per_file", {}),
                 "errors": read.get("errors", [])[:50], "skipped": read.get("skipped", [])},
        "stages": stage_stats,
        "code": extra.get("code"),
        "dedup": extra.get("dedup"),
        "output": {"clean": {"docs": out.get("docs_out", 0), "bytes": out.get("bytes_out", 0),
                             "source_docs": kept},
                   "removed": removed, "long": out.get("long", {"docs": 0, "bytes": 0}),
                   "by_lang": out.get("by_lang", {}), "by_source": out.get("by_source", {})},
        "balance": {"records_in": docs + malformed, "kept": kept, "removed": removed["docs"],
                    "malformed": malformed,
                    "ok": docs + malformed == kept + removed["docs"] + malformed},
        "config": {"shards": config.shards, "stages": config.stages},
    }


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ⏎ ")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows), ""]


def render_report(stats: dict) -> str:
    """report.md: the tables of stats.json and a few removed documents per stage."""
    inp, outp, bal = stats["inputs"], stats["output"], stats["balance"]
    timing = stats.get("timing", {})
    lines = ["# Data pipeline report", "",
             f"Inputs: {len(inp['paths'])} path(s), {inp['records']:,} records "
             f"({inp['documents']:,} documents, {inp['malformed']:,} malformed), "
             f"{_mb(inp['bytes'])} MB of text.", "",
             f"Kept: {outp['clean']['docs']:,} documents, {_mb(outp['clean']['bytes'])} MB in "
             f"`clean/` ({outp['clean']['source_docs']:,} input documents); removed: "
             f"{outp['removed']['docs']:,} documents, {_mb(outp['removed']['bytes'])} MB in "
             f"`removed/`; long-context subset: {outp['long']['docs']:,} documents, "
             f"{_mb(outp['long']['bytes'])} MB in `long/`.", "",
             f"Balance: {bal['records_in']:,} records in = {bal['kept']:,} kept + "
             f"{bal['removed']:,} removed + {bal['malformed']:,} malformed: "
             f"{'ok' if bal['ok'] else 'MISMATCH'}.", "", "## Stages", ""]
    rows = []
    for name, s in stats["stages"].items():
        t = timing.get(name)
        if name == "dedup" and "minhash" in timing:
            t = (t or 0) + timing["minhash"] + timing.get("dedup_keys", 0)
        rows.append([name, f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['docs_removed']:,}",
                     _mb(s["bytes_in"]), _mb(s["bytes_out"]), _mb(s["bytes_removed"]),
                     "" if t is None else f"{t:.1f}"])
    lines += _table(["stage", "docs in", "docs out", "docs removed", "MB in", "MB out",
                     "MB removed", "seconds"], rows)
    if "code_repos" in stats["stages"]:
        c = stats["stages"]["code_repos"]
        lines += [f"code_repos: {c['files_merged']:,} code files concatenated into "
                  f"{c['repo_docs']:,} repository documents.", ""]
    lines += ["## Removed, by reason", ""]
    rows = [[name, reason, f"{e['docs']:,}", _mb(e["bytes"])]
            for name, s in stats["stages"].items()
            for reason, e in sorted(s["removed"].items(), key=lambda kv: -kv[1]["docs"])]
    lines += _table(["stage", "reason", "docs", "MB"], rows) if rows else ["None.", ""]
    rd = stats["read"]
    if rd["malformed"] or rd["skipped"]:
        lines += ["## Malformed input", "",
                  f"{rd['malformed']:,} malformed records (in `removed/read/`, with file and "
                  "line): " + ", ".join(f"{k}: {v}" for k, v in sorted(rd["error_counts"].items()))
                  + ".", ""]
        lines += [f"- `{e['file']}:{e['line']}` {e['kind']}: {e['message']}"
                  for e in rd["errors"][:10]]
        lines += [f"- not read: `{f}` ({why})" for f, why in rd["skipped"][:10]] + [""]
    lines += ["## By language", ""]
    fmt_lang = stats["stages"]["format"]["by_lang"]
    long_lang = outp["long"].get("by_lang", {})
    rows = [[lang, f"{e.get('docs_in', 0):,}", _mb(e.get("bytes_in", 0)),
             f"{outp['by_lang'].get(lang, {}).get('docs_out', 0):,}",
             _mb(outp["by_lang"].get(lang, {}).get("bytes_out", 0)),
             f"{long_lang.get(lang, {}).get('docs', 0):,}"]
            for lang, e in sorted(fmt_lang.items(), key=lambda kv: -kv[1].get("bytes_in", 0))]
    lines += _table(["language", "docs in", "MB in", "docs kept", "MB kept", "long docs"], rows)
    lines += ["## By source", ""]
    fmt_src = stats["stages"]["format"]["by_source"]
    top = sorted(fmt_src.items(), key=lambda kv: -kv[1].get("bytes_in", 0))
    rows = [[src, f"{e.get('docs_in', 0):,}", _mb(e.get("bytes_in", 0)),
             f"{outp['by_source'].get(src, {}).get('docs_out', 0):,}",
             _mb(outp["by_source"].get(src, {}).get("bytes_out", 0))] for src, e in top[:20]]
    lines += _table(["source", "docs in", "MB in", "docs kept", "MB kept"], rows)
    if len(top) > 20:
        lines += [f"... and {len(top) - 20} more sources (stats.json).", ""]
    if stats.get("code"):
        c = stats["code"]
        lines += ["## Code", "", "Quality levels of code files: " + ", ".join(
            f"{k}: {v:,}" for k, v in sorted(c.get("levels", {}).items())) + ".", ""]
    if stats.get("dedup"):
        d = stats["dedup"]
        lines += ["## Deduplication", "",
                  f"{d.get('docs', 0):,} documents compared; LSH {d.get('bands', '-')} bands x "
                  f"{d.get('rows', '-')} rows; {d.get('candidate_checks', 0):,} candidate checks, "
                  f"{d.get('confirmed_pairs', 0):,} confirmed pairs, {d.get('clusters', 0):,} "
                  "clusters; removed: " + (", ".join(
                      f"{k}: {v:,}" for k, v in d.get("removed_by_reason", {}).items()) or "none")
                  + ".", ""]
    lg = outp["long"]
    if "candidates" in lg:
        lines += ["## Long-context subset", "",
                  f"{lg['candidates']:,} documents of at least the minimum size; "
                  f"{lg['docs']:,} selected ({_mb(lg['bytes'])} MB)" + (
                      "; not selected: " + ", ".join(f"{k}: {v}" for k, v in
                                                     sorted(lg["rejected"].items()))
                      if lg["rejected"] else "") + ".", ""]
    if stats.get("tokenize"):
        tk = stats["tokenize"]
        lines += ["## Token shards", ""]
        rows = [[f"{name} ({tk[name]['path']}/)", split, f"{tk[name][split]['docs']:,}",
                 f"{tk[name][split]['tokens']:,}", tk[name][split]["shards"]]
                for name in ("main", "long") if name in tk for split in ("train", "val")]
        lines += _table(["set", "split", "docs", "tokens", "shards"], rows)
        if "packing" in tk:
            p = tk["packing"]
            lines += [f"Packing check: {p['samples']:,} samples of {p['seq_len']} tokens "
                      f"({p['padding_tokens']:,} padding tokens).", ""]
    lines += ["## Examples of removed documents", ""]
    for name, s in stats["stages"].items():
        if not s["examples"]:
            continue
        lines += [f"### {name}", ""]
        for ex in s["examples"]:
            lines += [f"- `{ex['id']}` ({ex.get('source')}, {ex.get('lang')}): {_cell(ex['reason'])}",
                      f"  > {_cell(ex['text'])}"]
        lines.append("")
    if timing:
        lines += [f"Wall time: {timing.get('total', 0):.1f} s.", ""]
    return "\n".join(lines)


__all__ = [
    "STAGE_DEFAULTS",
    "LocalExecutor",
    "PipelineConfig",
    "RayExecutor",
    "ShardTask",
    "make_executor",
    "process_shard",
    "reason_key",
    "render_report",
    "run_pipeline",
]
