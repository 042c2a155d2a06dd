"""`internlm2 speedrun`: the whole pipeline on the built-in corpus, stage by stage.

Every stage writes its outputs under the run folder and a marker `stages/<name>.json`
(wall time, peak memory, figures) when it finishes; a rerun skips finished stages and
`--force STAGE` redoes one (and the stages after it). The stages that exist so far:

  corpus     built-in corpus (Python stdlib code + its docstrings, bilingual synthetic text)
  data       the data pipeline (configs/pipeline-builtin.toml): filters, safety, quality,
             code ordering, MinHash dedup, long-context selection
  tokenizer  byte-level BPE trained the report's way on the clean data; compression beside
             the official tokenizer
  shards     the clean data (high-quality code upsampled) and the long subset as token shards
  report     report.md with every stage's figures

Later stages (data pipeline, pretraining phases, SFT, reward model, PPO, evaluation) are
added here as they are built; `internlm2 speedrun --list` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

@dataclass
class Settings:
    out: Path
    quick: bool = False
    seed: int = 0

    @property
    def code_files(self) -> int | None:
        return 120 if self.quick else None

    @property
    def synthetic_docs(self) -> int:
        return 2000 if self.quick else 12000

    @property
    def retrieval_docs(self) -> int:  # needle-in-a-haystack documents for pretraining
        return 300 if self.quick else 4000

    @property
    def vocab_size(self) -> int:
        return 4096 if self.quick else 8192

    @property
    def pretrain_steps(self) -> int:
        return 30 if self.quick else 400

    # alignment sizes: (SFT conversations, preference pairs, PPO prompts), train + val
    @property
    def align_sizes(self) -> tuple[int, int, int]:
        return (200, 160, 40) if self.quick else (2000, 1000, 400)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- stages --------------------------------------------------------------------------------

def stage_corpus(s: Settings) -> dict:
    from .data.builtin import build_builtin_corpus
    return build_builtin_corpus(s.out / "corpus", seed=s.seed, code_files=s.code_files,
                                synthetic=s.synthetic_docs)


REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("code", "prose", "synthetic")


def stage_data(s: Settings) -> dict:
    from .data.pipeline import PipelineConfig, run_pipeline
    path = REPO / "configs" / "pipeline-builtin.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the speedrun needs the repository's configs/ folder "
                                "(install with `pip install -e .` from a checkout)")
    cfg = PipelineConfig.from_toml(path)
    cfg.inputs = [str(s.out / "corpus")]
    cfg.output = str(s.out / "data")
    cfg.workers = 2
    cfg.progress = False
    stats = run_pipeline(cfg, overwrite=True)
    st = stats.get("stages", {})
    return {"stages": {k: {f: v.get(f) for f in ("docs_in", "docs_out", "bytes_in", "bytes_out")}
                       for k, v in st.items() if isinstance(v, dict)},
            "long": stats["output"]["long"], "balance_ok": stats["balance"]["ok"],
            "report": str(s.out / "data" / "report.md")}


def _category(doc: dict) -> str:
    """The pretraining mixture a clean document belongs to."""
    src = str(doc.get("source", ""))
    if doc.get("lang") == "code" or src == "code":
        return "code"
    return "synthetic" if src.startswith("synthetic") else "prose"


def stage_shards(s: Settings) -> dict:
    """Token shards per mixture category (code / prose / synthetic) and for the long subset."""
    from .data.pipeline import iter_output_documents
    from .data.shards import write_token_shards
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(s.out / "tokenizer")
    out = {}
    clean, long_dir = s.out / "data" / "clean", s.out / "data" / "long"
    sets = [(c, clean, c) for c in CATEGORIES]
    if any(long_dir.glob("part-*.jsonl")):
        sets.append(("long", long_dir, None))
    for name, src, category in sets:
        docs = (d for d in iter_output_documents(src, upsample=category is not None)
                if category is None or _category(d) == category)
        m = write_token_shards(docs, tok, s.out / "shards" / name, val_fraction=0.02,
                               seed=s.seed, overwrite=True)
        out[name] = {split: {"docs": m["splits"][split]["num_docs"],
                             "tokens": m["splits"][split]["num_tokens"]} for split in ("train", "val")}
    # Retrieval-heavy documents (facts hidden in the cleaned prose, asked at the end) for the
    # phases' "retrieval" source; generated data, so written after the pipeline, not through it.
    from .data.builtin import retrieval_documents
    prose = [d["text"] for d in iter_output_documents(clean, upsample=False)
             if _category(d) == "prose"]
    m = write_token_shards(retrieval_documents(prose, s.retrieval_docs, seed=s.seed), tok,
                           s.out / "shards" / "retrieval", val_fraction=0.02, seed=s.seed,
                           overwrite=True)
    out["retrieval"] = {split: {"docs": m["splits"][split]["num_docs"],
                                "tokens": m["splits"][split]["num_tokens"]}
                        for split in ("train", "val")}
    return out


def stage_pretrain(s: Settings) -> dict:
    """The three phases on the speedrun's shards (configs/speedrun-cpu.toml), then the
    report's model versions: base (after the long-context phase) and internlm2 (after
    enhancement)."""
    from .tokenizer import load_tokenizer
    from .train import pretrain
    from .train.loop import read_metrics
    from .train.recipe import Recipe
    path = REPO / "configs" / "speedrun-cpu.toml"
    tok = load_tokenizer(s.out / "tokenizer")
    over = [f"data.tokenizer={json.dumps(str(s.out / 'tokenizer'))}",
            f"model.vocab_size={tok.vocab_size}", f"train.steps={s.pretrain_steps}",
            "train.progress=false", f"train.seed={s.seed}",
            f"checkpoint.every={max(10, s.pretrain_steps // 10)}"]
    if s.quick:  # a smoke test: a small validation set
        over += ["train.eval_tokens=8192"]
    over += [f"data.sources.{c}={json.dumps(str(s.out / 'shards' / c))}"
             for c in (*CATEGORIES, "retrieval")]
    recipe = Recipe.load(path, over)
    run_dir = s.out / "pretrain"
    summary = pretrain.run(recipe, run_dir, resume="auto")
    if summary.get("stopped"):
        raise RuntimeError(f"pretraining stopped: {summary['stopped']}")
    phases = sorted(p for p in run_dir.glob("phase*") if p.is_dir())
    if len(phases) < 3:
        raise RuntimeError(f"expected a model folder per phase under {run_dir}, found {phases}")
    for name, src in (("base", phases[1]), ("internlm2", phases[2])):
        _copy_model(src, s.out / name)
    rows = read_metrics(run_dir / "metrics.jsonl")
    per_phase: dict[int, dict] = {}
    for r in rows:
        if "val_loss" not in r:
            continue
        ph = per_phase.setdefault(int(r["phase"]), {"first": None, "last": None})
        if ph["first"] is None:
            ph["first"] = (r["step"], r["val_loss"], r.get("val_bpb"))
        ph["last"] = (r["step"], r["val_loss"], r.get("val_bpb"))
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"steps": summary["steps"], "final_val_loss": summary.get("val_loss"),
            "val_by_phase": {str(k): v for k, v in sorted(per_phase.items())},
            "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
            "models": {"base": str(s.out / "base"), "internlm2": str(s.out / "internlm2")}}


def stage_align_data(s: Settings) -> dict:
    """Generated bilingual alignment data: SFT conversations (tool and interpreter calls
    included), preference pairs in four domains, PPO prompts; train and validation files."""
    from .align.synth import build_alignment_data
    n_sft, n_pref, n_prompts = s.align_sizes
    paths = build_alignment_data(s.out / "align", n_sft=n_sft, n_pref=n_pref,
                                 n_prompts=n_prompts, seed=s.seed)
    return {k: {"path": str(v), "records": sum(1 for _ in open(v, encoding="utf-8"))}
            for k, v in paths.items()}


def _copy_model(src: Path, dst: Path) -> None:
    import shutil
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    shutil.copytree(src, dst)


def stage_sft(s: Settings) -> dict:
    """SFT of the enhanced model (`internlm2/`) on the generated conversations -> chat-sft/;
    then a check that it follows the chat format and calls tools with valid JSON."""
    from .align import sft
    from .align.synth import read_jsonl
    from .align.trainer import FinetuneArgs, run_finetune, setup_env
    from .hf import load_model
    from .tokenizer import load_tokenizer
    a = s.out / "align"
    tok = load_tokenizer(s.out / "internlm2")
    # Small batches, several epochs: a tiny model learns the format from many steps (on the
    # default run: 292 steps of 8 x 512 tokens, about 8 minutes).
    args = FinetuneArgs(model=str(s.out / "internlm2"), out=str(s.out / "sft"), lr=3e-3,
                        min_lr=3e-4, epochs=4, max_steps=8 if s.quick else 0, batch_size=8,
                        micro_batch_size=8, warmup_ratio=0.05, progress=False, log_every=10,
                        resume="auto", seed=s.seed)
    env = setup_env()
    stage = sft.sft_stage(args, [str(a / "sft.jsonl")], [str(a / "sft_val.jsonl")], 512, tok, env)
    summary = run_finetune(args, stage, env)
    _copy_model(s.out / "sft" / "model", s.out / "chat-sft")
    model = load_model(s.out / "chat-sft")
    held = read_jsonl(a / "sft_val.jsonl")[:12 if s.quick else 64]
    checks = sft.chat_checks(model, tok, held)
    return {"steps": summary["steps"], "val_loss": summary.get("val_loss"),
            "train_loss": summary.get("final_loss"), "checks": checks,
            "model": str(s.out / "chat-sft")}


def stage_rm(s: Settings) -> dict:
    """The conditional reward model from chat-sft/ on the generated preference pairs -> rm/."""
    from .align.reward import train_reward
    from .align.synth import read_jsonl
    from .align.trainer import FinetuneArgs
    a = s.out / "align"
    args = FinetuneArgs(model=str(s.out / "chat-sft"), out=str(s.out / "rm-train"), lr=5e-4,
                        min_lr=5e-5, weight_decay=0.01, epochs=1, max_steps=6 if s.quick else 0,
                        batch_size=16, micro_batch_size=8, warmup_ratio=0.05, progress=False,
                        log_every=10, resume="auto", seed=s.seed)
    summary = train_reward(args, read_jsonl(a / "pref.jsonl"), read_jsonl(a / "pref_val.jsonl"),
                           max_len=512)
    _copy_model(s.out / "rm-train" / "model", s.out / "rm")
    return {"steps": summary["steps"], "train_loss": summary.get("final_loss"),
            **{k: v for k, v in summary.items() if k.startswith("val_")},
            "model": str(s.out / "rm")}


def stage_ppo(s: Settings) -> dict:
    """Online PPO from chat-sft/ against rm/ with Fast Path rounds -> chat/ (also final/)."""
    from .align.ppo import PPOConfig, run_ppo
    from .align.synth import read_jsonl
    a = s.out / "align"
    q = s.quick
    cfg = PPOConfig(actor_lr=3e-5, critic_lr=5e-5, rounds=2, iterations=2 if q else 6,
                    mini_batches=4, ppo_epochs=2, whiten_advantages=True, temperature=0.7,
                    kl_coef=0.05,
                    critic_warmup=1 if q else 3, rollout_batch=8 if q else 32,
                    max_new_tokens=24 if q else 48, micro_batch_size=8, ptx_seq_len=512,
                    eval_every=0, max_eval_prompts=8 if q else 48, fastpath_prompts=8 if q else 32,
                    fastpath_min_pairs=4, seed=s.seed, max_prompt_len=512, rm_max_len=512)
    summary = run_ppo(cfg, actor=str(s.out / "chat-sft"), reward=str(s.out / "rm"),
                      prompts=read_jsonl(a / "prompts.jsonl"),
                      val_prompts=read_jsonl(a / "prompts_val.jsonl"), out=str(s.out / "ppo"),
                      ptx_data=[str(a / "sft.jsonl")], resume="auto", progress=False)
    _copy_model(Path(summary["model"]), s.out / "chat")
    final = s.out / "final"
    if final.is_symlink() or final.exists():
        final.unlink() if final.is_symlink() else _copy_model(s.out / "chat", final)
    if not final.exists():
        final.symlink_to("chat", target_is_directory=True)
    from .train.loop import read_metrics
    rows = read_metrics(s.out / "ppo" / "metrics.jsonl")
    keys = ("round", "iteration", "phase", "reward", "kl", "entropy", "response_length",
            "value_loss", "clip_frac", "val_reward")
    curve = [{k: r[k] for k in keys if k in r} for r in rows]
    fast = []
    for f in sorted((s.out / "ppo").glob("round*/fastpath.json")):
        rep = json.loads(f.read_text())
        fast.append({"round": f.parent.name, "findings": rep.get("findings", []),
                     "pairs": rep.get("pairs", rep.get("num_pairs"))})
    return {"steps": summary.get("steps"), "curve": curve, "fastpath": fast,
            "final": {k: v for k, v in summary.items() if k not in ("model", "reward_model")},
            "model": str(s.out / "chat")}


def stage_eval(s: Settings) -> dict:
    """Evaluation of the model versions: perplexity / bits per byte of the base and chat
    models on held-out shards, needle in a haystack on `base/` (lengths up to twice the
    phase-2 training length: past 2048 only dynamic NTK extrapolation holds it), the
    project's generated tasks on `chat/`; then the report card with every plot."""
    from .eval import niah, tasks
    from .eval.perplexity import perplexity, read_texts
    from .eval.report import build_report
    from .hf import load_model
    from .tokenizer import load_tokenizer
    ev = s.out / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(s.out / "chat")
    texts = read_texts([s.out / "shards" / c for c in CATEGORIES])
    # the first ~1,500 tokens of each held-out document (stdlib files run to tens of
    # thousands of tokens; a sliding window over all of them would dominate the stage)
    texts = {k: [t[:6000] if isinstance(t, str) else t[:1500] for t in v[:8 if s.quick else 40]]
             for k, v in texts.items()}
    ppl = {}
    for name in ("base", "chat"):
        res = perplexity(load_model(s.out / name), tok, texts, window=512, stride=256)
        ppl.update({f"{name}/{src}": {"nats": r["nats_per_token"], "ppl": r["perplexity"],
                                      "bpb": r["bits_per_byte"]} for src, r in res.items()})
    (ev / "ppl.json").write_text(json.dumps(ppl, indent=2))
    base = load_model(s.out / "base")
    base.config.rope_scaling = {"type": "dynamic", "factor": 2.0}  # extrapolate past 2048
    lengths = [256, 512] if s.quick else [256, 512, 1024, 2048, 3072, 4096]
    rows = niah.run_niah(base, tok, lengths, niah.depths(2 if s.quick else 5),
                         niah.DEFAULT_NEEDLES["en"], repeats=1 if s.quick else 2,
                         out_jsonl=ev / "niah.jsonl", max_new_tokens=12, prefill_chunk=1024,
                         seed=s.seed)
    summary = niah.summarize(rows)
    niah.heatmap(rows, ev / "niah.png", title="NIAH, base/ (dynamic NTK x2)")
    (ev / "niah.md").write_text(niah.markdown_table(rows) + "\n")
    files = tasks.generate_task_files(ev / "tasks", seed=s.seed, n=16 if s.quick else 50)
    results = tasks.run_tasks(load_model(s.out / "chat"), tok, files, shots=0,
                              limit=8 if s.quick else None)
    (ev / "tasks.json").write_text(json.dumps(
        {k: {"score": v["score"], "count": v["count"]} for k, v in results.items()}, indent=2))
    # The agent's own check (schema-valid arguments, not just a parseable call) on the SFT model
    # and on the RLHF model, over the held-out generated tool prompts.
    from .agent.loop import tool_call_validity
    from .align.data import iter_objects
    recs = [o for _, o in iter_objects(files["tool_calls"][1])][:8 if s.quick else 50]
    agent_tools = {name: {k: v for k, v in tool_call_validity(
        load_model(s.out / name), tok, recs, max_new_tokens=64).items() if k != "samples"}
        for name in ("chat-sft", "chat")}
    (ev / "agent_tools.json").write_text(json.dumps(agent_tools, indent=2))
    card = build_report(s.out)
    return {"ppl": ppl, "niah_overall": summary["overall"],
            "niah_by_length": {str(k): v for k, v in summary["by_length"].items()},
            "tasks": {k: v["score"] for k, v in results.items()}, "agent_tools": agent_tools,
            "report_card": str(card)}


def _samples(corpus: Path, per_kind: int = 40) -> dict[str, list[str]]:
    """Held-out-ish samples per kind for compression figures (last documents of each file)."""
    out: dict[str, list[str]] = {"english": [], "chinese": [], "code": []}
    for name, key in (("prose_en.jsonl", "english"), ("code.jsonl", "code")):
        lines = (corpus / name).read_text(encoding="utf-8").splitlines()[-per_kind:]
        out[key] = [json.loads(x)["text"] for x in lines]
    for line in (corpus / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()[::-1]:
        d = json.loads(line)
        if d["lang"] == "zh":
            out["chinese"].append(d["text"])
        if len(out["chinese"]) >= per_kind:
            break
    return out


def stage_tokenizer(s: Settings) -> dict:
    from .tokenizer import compression, load_tokenizer, official_tokenizer_path, train_tokenizer
    corpus = s.out / "corpus"
    files = sorted(str(p) for p in (s.out / "data" / "clean").glob("part-*.jsonl"))
    tok = train_tokenizer(files, vocab_size=s.vocab_size, output_dir=s.out / "tokenizer")
    samples = _samples(corpus)
    figures = {"vocab_size": tok.vocab_size,
               "chars_per_token": {k: round(compression(tok, v), 3) for k, v in samples.items()}}
    official = official_tokenizer_path()
    if official is not None:
        off = load_tokenizer(official)
        figures["official_chars_per_token"] = {
            k: round(compression(off, v), 3) for k, v in samples.items()}
    return figures


def stage_report(s: Settings) -> dict:
    stages = {}
    for name, _ in STAGES:
        p = s.out / "stages" / f"{name}.json"
        if p.exists():
            stages[name] = json.loads(p.read_text())
    lines = [f"# Speedrun report: `{s.out.name}`", "",
             f"Settings: quick={s.quick}, seed={s.seed}.", "",
             "| stage | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    for name, rec in stages.items():
        lines.append(f"| {name} | {rec['wall_s']:.1f} | {rec['peak_rss_mb']:.0f} |")
    if "corpus" in stages:
        lines += ["", "## Built-in corpus", "", "| part | documents | bytes |", "|---|---|---|"]
        for part, st in stages["corpus"]["figures"].items():
            lines.append(f"| {part} | {st['documents']} | {st['bytes']:,} |")
    if "data" in stages:
        lines += ["", "## Data pipeline", "", "| stage | docs in | docs out | MB in | MB out |",
                  "|---|---|---|---|---|"]
        for name, st in stages["data"]["figures"]["stages"].items():
            mb = lambda b: f"{b / 1e6:.2f}" if isinstance(b, (int, float)) else "n/a"
            lines.append(f"| {name} | {st.get('docs_in')} | {st.get('docs_out')} | "
                         f"{mb(st.get('bytes_in'))} | {mb(st.get('bytes_out'))} |")
        lg = stages["data"]["figures"]["long"]
        lines += ["", f"Long-context subset (documents over 32 KB that pass the statistical "
                  f"filters): {lg['docs']} documents, {lg['bytes'] / 1e6:.2f} MB.",
                  "", "Every removed document, with its stage and reason, is under `data/removed/`; "
                  "the pipeline's own report is `data/report.md`."]
    if "tokenizer" in stages:
        f = stages["tokenizer"]["figures"]
        lines += ["", "## Tokenizer", "",
                  f"Byte-level BPE, vocabulary {f['vocab_size']} (a multiple of 128, chat tokens last).",
                  "", "| text | ours (chars/token) | official 92,544 (chars/token) |", "|---|---|---|"]
        off = f.get("official_chars_per_token", {})
        for k, v in f["chars_per_token"].items():
            lines.append(f"| {k} | {v} | {off.get(k, 'n/a')} |")
    if "shards" in stages:
        lines += ["", "## Token shards", "", "| set | split | documents | tokens |", "|---|---|---|---|"]
        for name, splits in stages["shards"]["figures"].items():
            for split, st in splits.items():
                lines.append(f"| {name} | {split} | {st['docs']} | {st['tokens']:,} |")
    if "pretrain" in stages:
        f = stages["pretrain"]["figures"]
        lines += ["", "## Pretraining", "",
                  f"{f['steps']} steps in three phases (configs/speedrun-cpu.toml); median "
                  f"{f['median_tokens_per_s'] or 0:.0f} tokens/s. Validation loss (nats/token) "
                  "and bits per byte at the start and end of each phase, on the held-out "
                  "documents of the phase's own mixture at its sequence length:", "",
                  "| phase | first eval (step, loss, bpb) | last eval (step, loss, bpb) |",
                  "|---|---|---|"]
        fmt = lambda e: "n/a" if not e else f"{e[0]}, {e[1]:.3f}, " + \
            (f"{e[2]:.3f}" if e[2] is not None else "n/a")
        for ph, v in f["val_by_phase"].items():
            lines.append(f"| {ph} | {fmt(v['first'])} | {fmt(v['last'])} |")
        lines += ["", "Model folders: `base/` (after the long-context phase), `internlm2/` "
                  "(after the enhancement phase)."]
    lines += _align_report(stages)
    if "eval" in stages:
        f = stages["eval"]["figures"]
        lines += ["", "## Evaluation", "", "Perplexity and bits per byte on held-out shards "
                  "(window 512):", "", "| model / source | nats / token | bits / byte |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_num(v['nats'])} | {_num(v['bpb'])} |" for k, v in f["ppl"].items()]
        lines += ["", f"Needle in a haystack on `base/` with dynamic NTK x2 (trained at 2048 "
                  f"tokens): overall {_num(f['niah_overall'])}; by length "
                  + ", ".join(f"{k}: {_num(v)}" for k, v in f["niah_by_length"].items())
                  + ". Heatmap: `eval/niah.png`.", "",
                  "| task (chat/) | score |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in f["tasks"].items()]
        if f.get("agent_tools"):
            lines += ["", "Tool calling through the agent (`internlm2.agent.tool_call_validity`: "
                      "a parseable call to a listed tool with schema-valid arguments) on the "
                      "held-out generated tool prompts:", "",
                      "| model | prompts | valid | right tool (of valid) | arguments right |",
                      "|---|---|---|---|---|"]
            lines += [f"| {m} | {v['prompts']} | {_num(v['valid'])} | {_num(v['right_tool'])} | "
                      f"{_num(v['arguments'])} |" for m, v in f["agent_tools"].items()]
        lines += ["", "Every plot of the run: `report_card.md`."]
    if PENDING_STAGES:
        lines += ["", "## Stages not built yet", "", ", ".join(PENDING_STAGES) + "."]
    (s.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"report": str(s.out / "report.md")}


def _num(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def _align_report(stages: dict) -> list[str]:
    lines: list[str] = []
    if "align_data" in stages:
        f = stages["align_data"]["figures"]
        lines += ["", "## Alignment data (generated)", "", "| file | records |", "|---|---|"]
        lines += [f"| {k}.jsonl | {v['records']} |" for k, v in f.items()]
    if "sft" in stages:
        f = stages["sft"]["figures"]
        c = f["checks"]
        lines += ["", "## SFT", "",
                  f"{f['steps']} steps from `internlm2/`; train loss {_num(f['train_loss'])}, "
                  f"held-out loss {_num(f['val_loss'])} (assistant tokens only). On "
                  f"{c['prompts']} held-out prompts (greedy): the reply ends its turn "
                  f"{_num(c['ends_turn'], '.0%')}; tool prompts answered with a valid call "
                  f"(known tool, JSON arguments with the required keys) "
                  f"{_num(c['tool_call_valid'], '.0%')} of {c['tool_prompts']}; other prompts "
                  f"answered without an action block {_num(c['plain_without_action'], '.0%')}.",
                  "", "Samples:", ""]
        lines += [f"- `{t[:160]!r}`" for t in c["samples"][:4]]
        lines += ["", "Model: `chat-sft/`."]
    if "rm" in stages:
        f = stages["rm"]["figures"]
        accs = {k[8:]: v for k, v in f.items() if k.startswith("val_acc_")}
        lines += ["", "## Conditional reward model", "",
                  f"{f['steps']} steps from `chat-sft/`; held-out pairwise accuracy "
                  f"{_num(f.get('val_acc'))}; mean chosen / rejected score "
                  f"{_num(f.get('val_chosen'))} / {_num(f.get('val_rejected'))}.", "",
                  "| domain | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in sorted(accs.items())]
        lines += ["", "Model: `rm/` (InternLM2ForRewardModel)."]
    if "ppo" in stages:
        f = stages["ppo"]["figures"]
        lines += ["", "## Online PPO (COOL RLHF)", "",
                  "| round | iteration | phase | reward | KL | entropy | length | value loss | "
                  "clip frac | held-out reward |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in f["curve"]:
            lines.append("| " + " | ".join(str(r.get(k, "")) if k in ("round", "iteration", "phase")
                                            else _num(r.get(k)) for k in
                                            ("round", "iteration", "phase", "reward", "kl",
                                             "entropy", "response_length", "value_loss",
                                             "clip_frac", "val_reward")) + " |")
        for fp in f["fastpath"]:
            names = [x.get("detector", x.get("name")) for x in fp["findings"]] or ["none"]
            lines.append(f"\nFast Path after {fp['round']}: findings {', '.join(map(str, names))}; "
                         f"pairs {fp['pairs']}.")
        lines += ["", "Model: `chat/` (also `final/`)."]
    return lines


STAGES: list[tuple[str, Callable[[Settings], dict]]] = [
    ("corpus", stage_corpus),
    ("data", stage_data),
    ("tokenizer", stage_tokenizer),
    ("shards", stage_shards),
    ("pretrain", stage_pretrain),
    ("align_data", stage_align_data),
    ("sft", stage_sft),
    ("rm", stage_rm),
    ("ppo", stage_ppo),
    ("eval", stage_eval),
    ("report", stage_report),
]
PENDING_STAGES: list[str] = []


# What each stage writes under the run folder. A stage redone after it had finished (--force)
# starts from a clean slate; one that crashed keeps them, so it resumes from its checkpoints.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",), "data": ("data",), "tokenizer": ("tokenizer",), "shards": ("shards",),
    "pretrain": ("pretrain", "base", "internlm2"), "align_data": ("align",),
    "sft": ("sft", "chat-sft"), "rm": ("rm-train", "rm"), "ppo": ("ppo", "chat", "final"),
    "eval": ("eval", "figures", "report_card.md"),
}


def _clear_outputs(s: Settings, name: str) -> None:
    import shutil
    for rel in STAGE_OUTPUTS.get(name, ()):
        p = s.out / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def run(s: Settings, force: list[str] | None = None, log=print) -> dict:
    names = [n for n, _ in STAGES]
    force = force or []
    for f in force:
        if f not in names:
            raise ValueError(f"--force {f!r}: unknown stage; stages are {names}")
    first_forced = min((names.index(f) for f in force), default=len(names))
    (s.out / "stages").mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (name, fn) in enumerate(STAGES):
        marker = s.out / "stages" / f"{name}.json"
        if marker.exists() and i < first_forced and name != "report":
            log(f"[{i + 1}/{len(STAGES)}] {name}: done earlier, skipped")
            results[name] = json.loads(marker.read_text())
            continue
        log(f"[{i + 1}/{len(STAGES)}] {name} ...")
        if marker.exists():  # finished before and redone now: no stale checkpoints to resume
            marker.unlink()
            _clear_outputs(s, name)
        t0 = time.perf_counter()
        figures = fn(s)
        rec = {"stage": name, "wall_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(),
               "figures": figures}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False))
        os.replace(tmp, marker)
        results[name] = rec
        log(f"[{i + 1}/{len(STAGES)}] {name}: {rec['wall_s']:.1f}s")
    return results


def publish(run_dir: Path, dest: Path) -> Path:
    """Copy a finished run's report (report.md, then the report card's plots) into
    `dest/speedrun-report.md` with its PNGs under `dest/speedrun/`, every image link rewritten
    to the copy: the form the repository keeps in docs/."""
    import re
    import shutil
    run_dir, dest = Path(run_dir), Path(dest)
    parts = [run_dir / "report.md", run_dir / "report_card.md"]
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: run the speedrun to the end first")
    figs = dest / "speedrun"
    figs.mkdir(parents=True, exist_ok=True)

    def copy(m: re.Match) -> str:
        src = run_dir / m.group(2)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: an image the report links to is missing")
        shutil.copyfile(src, figs / src.name)
        return f"![{m.group(1)}](speedrun/{src.name})"

    text = "\n\n".join(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", copy, p.read_text(encoding="utf-8"))
                       for p in parts)
    out = dest / "speedrun-report.md"
    out.write_text(text, encoding="utf-8")
    return out


def main(args: argparse.Namespace) -> int:
    if args.list:
        for name, fn in STAGES:
            print(f"{name:10s} built")
        for name in PENDING_STAGES:
            print(f"{name:10s} not built yet")
        return 0
    s = Settings(out=Path(args.out), quick=args.quick, seed=args.seed)
    if args.publish:  # only copy a finished run's report
        print(publish(s.out, Path(args.publish)))
        return 0
    run(s, force=args.force)
    print(f"\nreport: {s.out / 'report.md'}")
    if (s.out / "final").exists():
        print(f"chat with it:  internlm2 chat --model {s.out / 'final'}")
        print(f"serve it:      internlm2 serve --model {s.out / 'final'}   "
              "(OpenAI API and web chat on http://127.0.0.1:23333)")
    if PENDING_STAGES:
        print("stages still to come: " + ", ".join(PENDING_STAGES), file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("speedrun", help="run the whole pipeline on the built-in corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun)")
    p.add_argument("--quick", action="store_true", help="smaller settings (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and the stages after it (repeatable)")
    p.add_argument("--list", action="store_true", help="list the stages and exit")
    p.add_argument("--publish", metavar="DIR", default=None,
                   help="copy the finished run's report and plots to DIR/speedrun-report.md "
                        "and DIR/speedrun/ (the repository keeps one in docs/)")
    p.set_defaults(func=main)
