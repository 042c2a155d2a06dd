"""`internlm2 agent`: a terminal agent with tools and the code interpreter, streaming as it works."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from typing import Any, TextIO

HELP = "commands: /reset clears the conversation, /upload PATH gives the interpreter a file, /exit quits"


def print_events(events: Iterable[Any], out: TextIO = sys.stdout) -> Any:
    """Write an agent's events as they arrive; returns the final event."""
    final = None
    for ev in events:
        if ev.kind == "text":
            out.write(ev.text)
        elif ev.kind == "action":
            if ev.code is not None:
                out.write(f"\n[run python]\n{ev.code}\n")
            else:
                out.write(f"\n[call {ev.name}] {ev.arguments}\n")
        elif ev.kind == "result":
            out.write(f"[{ev.name} result]\n{ev.text}\n")
            out.writelines(f"[image] {img}\n" for img in ev.images)
        elif ev.kind == "error":
            out.write(f"\n[error] {ev.text}\n")
        elif ev.kind == "final":
            final = ev
            if ev.reason != "answer":
                out.write(f"\n[{ev.text}]")
            out.write("\n")
        out.flush()
    return final


def build_agent(args: argparse.Namespace, model: Any, tokenizer: Any = None) -> Any:
    """The Agent (or ReActAgent) the command line asks for, around a loaded model or backend."""
    from ..chat_format import DEFAULT_SYSTEM_PROMPT
    from ..generate import GenerationConfig
    from .builtin import builtin_tools
    workdir = args.workdir
    if workdir is None and ("files" in (args.tools or "") or args.interpreter):
        workdir = tempfile.mkdtemp(prefix="internlm2-agent-")
        print(f"(working folder: {workdir})", file=sys.stderr)
    tools = builtin_tools(args.tools or "", workdir=workdir, docs=args.docs)
    interpreter: Any = False
    if args.interpreter:
        from .interpreter import Interpreter
        interpreter = Interpreter(workdir=workdir, timeout=args.code_timeout)
    config = GenerationConfig.chat(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    cls: Any
    if args.react:
        from .react import ReActAgent as cls
    else:
        from .loop import Agent as cls
    return cls(model, tokenizer, tools=tools, interpreter=interpreter,
               system=args.system if args.system is not None else DEFAULT_SYSTEM_PROMPT,
               max_steps=args.max_steps, config=config)


def agent_session(agent: Any, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
                  interactive: bool | None = None) -> int:
    """Read user turns until EOF or /exit; stream each turn's thoughts, actions and results."""
    if interactive is None:
        interactive = stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        if interactive:
            stdout.write("\nuser> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            agent.reset()
            print("(conversation cleared)", file=stdout)
            continue
        if text.startswith("/upload"):
            try:
                name = agent.upload(text[len("/upload"):].strip())
                print(f"(uploaded {name})", file=stdout)
            except (ValueError, FileNotFoundError) as e:
                print(f"(upload failed: {e})", file=stdout)
            continue
        if interactive:
            stdout.write("assistant> ")
        print_events(agent.chat_stream(text), stdout)


def main(args: argparse.Namespace, model: Any = None, tokenizer: Any = None) -> int:
    if model is None:
        from ..chat import load_for_inference
        model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    agent = build_agent(args, model, tokenizer)
    try:
        if args.once is not None:
            final = print_events(agent.stream(args.once))
            return 0 if final is not None and final.reason == "answer" else 3
        return agent_session(agent)
    finally:
        agent.close()
        if agent.interpreter is not None and args.interpreter:
            agent.interpreter.close()


def add_cli(sub: Any) -> None:
    p = sub.add_parser("agent", help="an agent with tools and a code interpreter in the terminal",
                       description="Tool-using agent on the official InternLM2 protocol. " + HELP)
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tools", default="calculator,time",
                   help="comma-separated built-in tools: calculator,time,files,search ('' = none)")
    p.add_argument("--interpreter", action="store_true", help="enable the Python code interpreter")
    p.add_argument("--code-timeout", type=float, default=30.0, help="seconds per interpreter cell")
    p.add_argument("--workdir", default=None, help="folder for the file tool and the interpreter")
    p.add_argument("--docs", default=None, help="document folder for the 'search' tool")
    p.add_argument("--max-steps", type=int, default=8, help="model replies per user turn")
    p.add_argument("--react", action="store_true",
                   help="ReAct text protocol for models without the action tokens")
    p.add_argument("--once", default=None, metavar="QUESTION", help="answer one question and exit (exit status 3 when the step limit is hit)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=main)
