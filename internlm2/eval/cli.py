"""`internlm2 eval ...`: the evaluation commands (niah, ppl, tasks, report)."""

from __future__ import annotations

import argparse
import importlib

# Modules that add a subcommand to the `eval` group through `add_cli(eval_subparsers)`.
_EVAL_MODULES = ["internlm2.eval.niah", "internlm2.eval.perplexity", "internlm2.eval.tasks",
                 "internlm2.eval.report"]


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluation: niah, ppl, tasks, report",
                              description="Needle in a haystack, perplexity and bits per byte, "
                                          "the task harness, and a run's report card.")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])
    for name in _EVAL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a part not built yet
        mod.add_cli(sub)
    return p
