"""`internlm2 serve --model DIR`: the OpenAI-compatible server and web chat on one port."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _split(text: str | None) -> list[str] | None:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    return items or None


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    from ..chat import load_for_inference
    from ..engine import AsyncEngine, Engine
    from .app import create_app

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: not a folder")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_keys:
        print(f"warning: serving on {args.host} without --api-keys: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    model, tok = load_for_inference(args.model, args.device, args.dtype)
    engine = Engine(model, tok, block_size=args.block_size, num_blocks=args.num_blocks,
                    memory_fraction=args.memory_fraction, max_batch_size=args.max_batch_size,
                    session_len=args.session_len, prefill_token_budget=args.prefill_budget)
    aengine = AsyncEngine(engine)
    name = args.model_name or Path(args.model).resolve().name
    agent = None
    if args.interpreter or args.agent_tools:
        from .agent_routes import AgentSettings
        agent = AgentSettings(interpreter=args.interpreter, tools=_split(args.agent_tools) or (),
                              interpreter_timeout_s=args.interpreter_timeout,
                              interpreter_memory_mb=args.interpreter_memory_mb,
                              max_sessions=args.agent_max_sessions,
                              idle_timeout_s=args.agent_idle_timeout, docs=args.agent_docs)
    app = create_app(aengine, tok, model_name=name, api_keys=_split(args.api_keys),
                     cors_origins=_split(args.cors), max_tokens_limit=args.max_tokens_limit,
                     agent=agent)
    print(f"serving {name!r} on http://{args.host}:{args.port}  (web chat at /, API at /v1; "
          f"{engine.num_total_blocks} KV blocks of {engine.block_size}, session length "
          f"{engine.session_len})", file=sys.stderr)
    aengine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        aengine.shutdown()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page",
                       description="Serve a checkpoint over the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/embeddings, /v1/models, /v1/tokenize) "
                                   "with a web chat at /.")
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=23333)
    p.add_argument("--model-name", default=None, help="name clients send as 'model' "
                                                      "(default: the folder name)")
    p.add_argument("--api-keys", default=None, help="comma-separated keys; when set, /v1 routes "
                                                    "need 'Authorization: Bearer KEY'")
    p.add_argument("--cors", default=None, help="comma-separated allowed origins ('*' for any)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (default: from --memory-fraction)")
    p.add_argument("--memory-fraction", type=float, default=0.3,
                   help="share of free memory for the KV cache")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    p.add_argument("--session-len", type=int, default=None,
                   help="max prompt + output tokens per request (default: the model's)")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled per engine step")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    g = p.add_argument_group("agent", "POST /v1/agent/chat: the agent loop with tools and a "
                                      "sandboxed Python interpreter (the web chat's toggle)")
    g.add_argument("--interpreter", action="store_true",
                   help="enable the code interpreter (one sandboxed session per chat)")
    g.add_argument("--agent-tools", default=None,
                   help="comma-separated built-in tools requests may use (calculator,time,"
                        "files,search)")
    g.add_argument("--agent-docs", default=None, help="document folder for the 'search' tool")
    g.add_argument("--interpreter-timeout", type=float, default=30.0,
                   help="wall-clock seconds per code cell")
    g.add_argument("--interpreter-memory-mb", type=int, default=1024,
                   help="address-space limit of each interpreter process")
    g.add_argument("--agent-max-sessions", type=int, default=8,
                   help="interpreter sessions alive at once (more get 429)")
    g.add_argument("--agent-idle-timeout", type=float, default=900.0,
                   help="seconds before an unused session (and its state) is closed")
    p.set_defaults(func=serve_main)
