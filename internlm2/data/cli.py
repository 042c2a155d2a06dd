"""`internlm2 data ...`: run the pipeline, write the built-in corpus, train the quality classifier.

  internlm2 data run --config pipeline.toml [flags]
  internlm2 data run --input PATH... --output DIR [--tokenizer PATH] [--workers N]
                     [--executor local|ray]
  internlm2 data builtin --output DIR [--seed N] [--quick]
  internlm2 data train-classifier --input labelled.jsonl --output MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def run_main(args: argparse.Namespace) -> int:
    from .pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig.from_toml(args.config) if args.config else PipelineConfig()
    if args.input:
        cfg.inputs = list(args.input)
    if args.output:
        cfg.output = args.output
    if args.tokenizer:
        cfg.stages["tokenize"]["tokenizer"] = args.tokenizer
    if args.seq_len:
        cfg.stages["tokenize"]["seq_len"] = args.seq_len
    for name in ("workers", "executor", "shards", "ray_address", "text_key"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.keep_work:
        cfg.keep_work = True
    if args.no_progress:
        cfg.progress = False
    for stage in args.skip or []:
        if stage not in ("rules", "safety", "quality", "code", "dedup", "longctx"):
            raise ValueError(f"--skip: unknown stage {stage!r}")
        cfg.stages[stage]["enabled"] = False
    try:
        stats = run_pipeline(cfg, overwrite=args.overwrite)
    except ImportError as e:  # an optional dependency (ray, fasttext, pyarrow): one line
        raise ValueError(str(e)) from e
    print(summary(stats, cfg.output))
    return 0 if stats["balance"]["ok"] else 1


def summary(stats: dict, output: str) -> str:
    """A few lines for the terminal; report.md has the rest."""
    lines = [f"{'stage':<11}{'docs in':>10}{'docs out':>10}{'removed':>9}{'MB in':>10}"
             f"{'MB out':>10}"]
    for name, s in stats["stages"].items():
        lines.append(f"{name:<11}{s['docs_in']:>10,}{s['docs_out']:>10,}{s['docs_removed']:>9,}"
                     f"{s['bytes_in'] / 1e6:>10.2f}{s['bytes_out'] / 1e6:>10.2f}")
    out, inp = stats["output"], stats["inputs"]
    lines.append(f"records in {inp['records']:,} (malformed {inp['malformed']:,}); kept "
                 f"{out['clean']['docs']:,} docs in {output}/clean, removed "
                 f"{out['removed']['docs']:,} in {output}/removed, long-context "
                 f"{out['long']['docs']:,} in {output}/long")
    if stats.get("tokenize"):
        t = stats["tokenize"]["main"]
        lines.append(f"tokens: train {t['train']['tokens']:,}, val {t['val']['tokens']:,} in "
                     f"{output}/shards")
    lines.append(f"wall time {stats['timing'].get('total', 0):.1f} s; see {output}/report.md")
    return "\n".join(lines)


def builtin_main(args: argparse.Namespace) -> int:
    from .builtin import build_builtin_corpus

    kwargs = {}
    code_files = args.code_files if args.code_files is not None else (120 if args.quick else None)
    synthetic = args.synthetic if args.synthetic is not None else (2000 if args.quick else None)
    if synthetic is not None:
        kwargs["synthetic"] = synthetic
    t0 = time.perf_counter()
    stats = build_builtin_corpus(args.output, seed=args.seed, code_files=code_files, **kwargs)
    print(json.dumps(stats, indent=2))
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s; next: internlm2 data run "
          f"--config configs/pipeline-builtin.toml --input {args.output} --output DIR",
          file=sys.stderr)
    return 0


def check_main(args: argparse.Namespace) -> int:
    from ..align.data import check_file
    bad = 0
    for path in args.files:
        count, problems = check_file(path, args.kind)
        for p in problems[:args.max_problems or None]:
            print(p)
        if len(problems) > (args.max_problems or len(problems)):
            print(f"{path}: ... {len(problems) - args.max_problems} more problem(s)")
        print(f"{path}: {count} record(s), {len(problems)} problem(s)"
              + ("" if problems else f": valid {args.kind} data"), file=sys.stderr)
        bad += len(problems)
    return 1 if bad else 0


def add_cli(subparsers) -> None:
    """Add the `data` command group (run, builtin, train-classifier, check)."""
    p = subparsers.add_parser("data", help="data pipeline: run, builtin corpus, train-classifier",
                              description="The pretraining data pipeline (report section 3.1).")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])

    r = sub.add_parser(
        "run", help="run (or resume) the pipeline: clean/, removed/, long/, shards/, report.md",
        description="Read, format, filter (rules, safety, quality), process code, deduplicate, "
                    "select long-context documents and tokenize. Flags override the config. "
                    "A rerun resumes: finished shards are not redone.")
    r.add_argument("--config", help="pipeline TOML (e.g. configs/pipeline-builtin.toml)")
    r.add_argument("--input", nargs="+", action="extend",
                   help="input files, folders, globs, code:REPO or hf:NAME (replace the config's)")
    r.add_argument("--output", help="output folder")
    r.add_argument("--tokenizer", help="tokenize clean/ into DIR/shards with this tokenizer")
    r.add_argument("--seq-len", type=int, help="sequence length of the packing check")
    r.add_argument("--workers", type=int, help="processes (local) or CPUs (local Ray); 0: all")
    r.add_argument("--executor", choices=("local", "ray"))
    r.add_argument("--ray-address", help="Ray cluster address (default: a local instance)")
    r.add_argument("--shards", type=int, help="shards per stage (the output depends on it)")
    r.add_argument("--text-key", help="text field of jsonl/parquet records")
    r.add_argument("--skip", nargs="+", metavar="STAGE",
                   help="turn stages off: rules safety quality code dedup longctx")
    r.add_argument("--overwrite", action="store_true",
                   help="delete the outputs of an earlier run with other settings first")
    r.add_argument("--keep-work", action="store_true", help="keep DIR/.work (intermediates)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=run_main)

    b = sub.add_parser("builtin", help="write the built-in corpus (stdlib code and prose, "
                                       "bilingual synthetic text)",
                       description="Write code.jsonl, prose_en.jsonl and synthetic.jsonl: the "
                                   "input for a machine with no data and no network.")
    b.add_argument("--output", required=True, help="folder to write")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true",
                   help="small: 120 stdlib files and 2000 synthetic documents")
    b.add_argument("--code-files", type=int, help="stdlib files to sample (default: all)")
    b.add_argument("--synthetic", type=int, help="synthetic documents")
    b.set_defaults(func=builtin_main)

    c = sub.add_parser("check", help="validate SFT / preference / PPO-prompt jsonl files",
                       description="Report every problem of alignment data files at once, each "
                                   "with file, line and field. Exit status 1 when any.")
    c.add_argument("files", nargs="+", help="jsonl files")
    c.add_argument("--kind", required=True, choices=("sft", "pref", "prompt"))
    c.add_argument("--max-problems", type=int, default=0, help="print at most N per file (0: all)")
    c.set_defaults(func=check_main)

    from .quality import add_cli as add_quality_cli
    add_quality_cli(sub)
