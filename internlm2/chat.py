"""`internlm2 chat` (interactive, streaming, multi-turn) and `internlm2 generate` (one prompt)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import torch

HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def pick_device(name: str | None) -> str:
    if name and name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype {name!r}: choose one of {sorted(table)}")
    return table[name]


def load_for_inference(path: str, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) from a checkpoint folder, in eval mode on the chosen device."""
    from .hf import load_model
    from .tokenizer import load_tokenizer
    dev = pick_device(device)
    model = load_model(path, device=dev, dtype=pick_dtype(dtype, dev)).eval()
    return model, load_tokenizer(path)


def _gen_config(args: argparse.Namespace, tokenizer):
    from .generate import GenerationConfig
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop_ids=list(dict.fromkeys(tokenizer.stop_ids)), compile=getattr(args, "compile", False))


def chat_session(model, tokenizer, config, system: str | None, stdin: TextIO = sys.stdin,
                 stdout: TextIO = sys.stdout, interactive: bool | None = None) -> int:
    """Read user turns from `stdin`, stream replies to `stdout`; returns at EOF or /exit."""
    from .chat_format import render_chat
    from .generate import stream_text
    if interactive is None:
        interactive = stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        if interactive:
            stdout.write("\nuser> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(conversation cleared)", file=stdout)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [m for m in messages if m["role"] != "system"]
            print("(system prompt set)" if system else "(system prompt removed)", file=stdout)
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.encode(render_chat(messages), add_bos=False)
        if interactive:
            stdout.write("assistant> ")
        stream = stream_text(model, tokenizer, prompt, config)
        for delta in stream:
            stdout.write(delta)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": stream.text})


def chat_main(args: argparse.Namespace) -> int:
    model, tok = load_for_inference(args.model, args.device, args.dtype)
    from .chat_format import DEFAULT_SYSTEM_PROMPT
    system = None if args.no_system else (args.system or DEFAULT_SYSTEM_PROMPT)
    return chat_session(model, tok, _gen_config(args, tok), system)


def generate_main(args: argparse.Namespace) -> int:
    from .chat_format import render_chat
    from .generate import stream_text
    model, tok = load_for_inference(args.model, args.device, args.dtype)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        prompt = tok.encode(render_chat(msgs), add_bos=False)
    else:
        prompt = tok.encode(args.prompt, add_bos=True)
    cfg = _gen_config(args, tok)
    stream = stream_text(model, tok, prompt, cfg)
    if args.echo and not args.chat:
        sys.stdout.write(args.prompt)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{len(stream.completions[0].tokens)} tokens, finish: {stream.finish_reason}]",
          file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser, temperature: float, top_p: float, max_new: int) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU)")
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (one prompt at a time): about 2x faster "
                        "decoding on a CPU after a compile of ~10 s, repeated when the context "
                        "grows past the next multiple of 256 tokens")
    p.add_argument("--system", default=None, help="system prompt")


def add_cli(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)",
                       description="Interactive chat. " + HELP + ". EOF (Ctrl-D) exits.")
    _common(p, temperature=0.8, top_p=0.8, max_new=1024)  # the official chat defaults
    p.add_argument("--no-system", action="store_true", help="no system prompt at all")
    p.set_defaults(func=chat_main)

    p = sub.add_parser("generate", help="complete one prompt and print the text")
    _common(p, temperature=0.0, top_p=1.0, max_new=128)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.set_defaults(func=generate_main)
