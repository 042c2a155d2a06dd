"""`internlm2 eval report RUN_DIR`: one markdown page with every figure of a run.

Reads what the stages left in a run folder (a speedrun's layout, or any folder with some of
these parts) and writes `RUN_DIR/report_card.md` with its plots in `RUN_DIR/figures/`:

  pretrain/metrics.jsonl   training loss and validation loss per phase (plot)
  sft/metrics.jsonl        SFT loss curve (plot); stages/sft.json chat checks and samples
  rm-train/metrics.jsonl   reward-model accuracy curve; held-out accuracy per domain
  ppo/metrics.jsonl        reward, KL and response length per iteration (plot); Fast Path
                           findings from ppo/round*/fastpath.json
  dpo/metrics.jsonl        DPO margins (plot) when present
  eval/niah.png, eval/niah.md, eval/tasks.json, eval/ppl.json   evaluation results

Missing parts are skipped; the page says what it found. Plots need matplotlib (the `plot`
extra); without it the page keeps its tables and says the plots were skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], xlabel: str,
          ylabel: str) -> bool:
    plt = _plt()
    if plt is None or not any(xs for _, xs, _ in series):
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _xy(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if key in r and x in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _fmt(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def build_report(run: str | Path) -> Path:
    """Write RUN/report_card.md (and RUN/figures/*.png); returns the page's path."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run folder")
    figs = run / "figures"
    lines = [f"# Report card: `{run.name}`", ""]
    found: list[str] = []
    skipped_plots = _plt() is None

    def image(name: str, ok: bool) -> None:
        if ok:
            lines.extend([f"![{name}](figures/{name}.png)", ""])

    # pretraining
    rows = _rows(run / "pretrain" / "metrics.jsonl")
    if rows:
        found.append("pretraining")
        lines += ["## Pretraining", ""]
        series = [("train loss", *_xy(rows, "loss"))]
        phases = sorted({r.get("phase") for r in rows if "val_loss" in r and r.get("phase")})
        for ph in phases:
            series.append((f"val loss, phase {ph}",
                           *_xy([r for r in rows if r.get("phase") == ph], "val_loss")))
        image("pretrain_loss", _plot(figs / "pretrain_loss.png", "Pretraining loss", series,
                                     "step", "nats / token"))
        lines += ["| phase | first val loss | last val loss | last val bpb |", "|---|---|---|---|"]
        for ph in phases:
            v = [r for r in rows if r.get("phase") == ph and "val_loss" in r]
            lines.append(f"| {ph} | {_fmt(v[0]['val_loss'])} | {_fmt(v[-1]['val_loss'])} | "
                         f"{_fmt(v[-1].get('val_bpb'))} |")
        lines.append("")

    # SFT
    rows = _rows(run / "sft" / "metrics.jsonl")
    sft = (_json(run / "stages" / "sft.json") or {}).get("figures", {})
    if rows or sft:
        found.append("SFT")
        lines += ["## SFT", ""]
        image("sft_loss", _plot(figs / "sft_loss.png", "SFT loss (assistant tokens)",
                                [("train", *_xy(rows, "loss")), ("held-out", *_xy(rows, "val_loss"))],
                                "step", "nats / token"))
        checks = sft.get("checks") or {}
        if checks:
            lines += ["| check | share |", "|---|---|",
                      f"| ends its turn | {_fmt(checks.get('ends_turn'), '.0%')} |",
                      (f"| valid tool call on tool prompts ({checks.get('tool_prompts')}) | "
                      f"{_fmt(checks.get('tool_call_valid'), '.0%')} |"),
                      (f"| no action block on other prompts | "
                      f"{_fmt(checks.get('plain_without_action'), '.0%')} |"), ""]
            lines += ["Samples:", ""] + [f"- `{s[:160]!r}`" for s in checks.get("samples", [])[:4]]
            lines.append("")

    # reward model
    rows = _rows(run / "rm-train" / "metrics.jsonl")
    rm = (_json(run / "stages" / "rm.json") or {}).get("figures", {})
    if rows or rm:
        found.append("reward model")
        lines += ["## Reward model", ""]
        image("rm_acc", _plot(figs / "rm_acc.png", "Reward model pairwise accuracy",
                              [("train batch", *_xy(rows, "train_acc")),
                               ("held-out", *_xy(rows, "val_acc"))], "step", "accuracy"))
        accs = {k[8:]: v for k, v in rm.items() if k.startswith("val_acc_")}
        if accs:
            lines += ["| domain | held-out accuracy |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(accs.items())]
            lines += [f"| all | {_fmt(rm.get('val_acc'))} |", ""]

    # PPO
    rows = _rows(run / "ppo" / "metrics.jsonl")
    if rows:
        found.append("PPO")
        lines += ["## Online PPO", ""]
        ok = _plot(figs / "ppo_reward.png", "PPO reward",
                   [("rollout reward", *_xy(rows, "reward")), ("held-out reward", *_xy(rows, "val_reward"))],
                   "step", "reward")
        image("ppo_reward", ok)
        ok = _plot(figs / "ppo_kl_length.png", "PPO KL and response length",
                   [("KL (nats / response)", *_xy(rows, "kl")),
                    ("length / 10 (tokens)", *[v if i == 0 else [y / 10 for y in v]
                                               for i, v in enumerate(_xy(rows, "response_length"))])],
                   "step", "")
        image("ppo_kl_length", ok)
        for f in sorted((run / "ppo").glob("round*/fastpath.json")):
            rep = _json(f) or {}
            names = [x.get("name", x.get("detector")) for x in rep.get("findings", [])]
            lines.append(f"- Fast Path after {f.parent.name}: "
                         f"{', '.join(map(str, names)) or 'no finding'}; pairs {rep.get('pairs', 0)}")
        lines.append("")

    # DPO
    rows = _rows(run / "dpo" / "metrics.jsonl")
    if rows:
        found.append("DPO")
        lines += ["## DPO", ""]
        image("dpo_margin", _plot(figs / "dpo_margin.png", "DPO reward margin",
                                  [("train", *_xy(rows, "train_margin")),
                                   ("held-out", *_xy(rows, "val_margin"))], "step", "margin"))

    # evaluation
    ev = run / "eval"
    if (ev / "niah.png").is_file() or (ev / "niah.md").is_file():
        found.append("needle in a haystack")
        lines += ["## Needle in a haystack", ""]
        if (ev / "niah.png").is_file():
            lines += ["![niah](eval/niah.png)", ""]
        if (ev / "niah.md").is_file():
            lines += [(ev / "niah.md").read_text(encoding="utf-8"), ""]
    tasks = _json(ev / "tasks.json")
    if isinstance(tasks, dict) and tasks:
        found.append("tasks")
        lines += ["## Tasks", "", "| task | score | n |", "|---|---|---|"]
        for name, r in tasks.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {_fmt(r.get('score'))} | {r.get('count', r.get('n', ''))} |")
        lines.append("")
    ppl = _json(ev / "ppl.json")
    if isinstance(ppl, dict) and ppl:
        found.append("perplexity")
        lines += ["## Perplexity", "", "| source | nats / token | perplexity | bits / byte |",
                  "|---|---|---|---|"]
        for src, r in ppl.items():
            if isinstance(r, dict):
                lines.append(f"| {src} | {_fmt(r.get('nats'))} | {_fmt(r.get('ppl'))} | "
                             f"{_fmt(r.get('bpb'))} |")
        lines.append("")

    head = ["Parts found: " + (", ".join(found) if found else "none") + "."]
    if skipped_plots:
        head.append("Plots skipped: matplotlib is not installed (`pip install -e '.[plot]'`).")
    lines[2:2] = head + [""]
    page = run / "report_card.md"
    page.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return page


def _main(ns: argparse.Namespace) -> int:
    page = build_report(ns.run)
    print(f"wrote {page}")
    return 0


def add_cli(eval_subparsers) -> argparse.ArgumentParser:
    p = eval_subparsers.add_parser("report", help="one markdown page with every figure of a run",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (e.g. runs/speedrun)")
    p.set_defaults(func=_main)
    return p


__all__ = ["add_cli", "build_report"]
