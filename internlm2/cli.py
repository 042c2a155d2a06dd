"""`internlm2 <command>`: one subcommand per stage; each module adds its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands through `add_cli(subparsers)`, in help order.
_COMMAND_MODULES = [
    "internlm2.chat",        # chat, generate
    "internlm2.hf",          # convert, info
    "internlm2.tokenizer",   # tokenizer train|encode
    "internlm2.data.cli",    # data run|builtin|train-classifier
    "internlm2.train.pretrain",  # pretrain
    "internlm2.align.sft",   # sft
    "internlm2.align.lora",  # lora merge
    "internlm2.align.reward",  # reward train|score
    "internlm2.align.ppo",   # ppo
    "internlm2.align.dpo",   # dpo
    "internlm2.eval.cli",    # eval niah|ppl|tasks|report
    "internlm2.agent.cli",   # agent
    "internlm2.speedrun",    # speedrun
    "internlm2.serve.cli",   # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2",
        description="InternLM2: model, data, training, alignment, evaluation and serving.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"internlm2 {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
