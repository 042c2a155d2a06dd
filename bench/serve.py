"""Serving throughput: our OpenAI server (continuous batching over HTTP) vs transformers.

    python bench/serve.py [--preset tiny] [--prompts 64] [--new 64] [--clients 16] [--quick]

Ours: `internlm2 serve`'s app (uvicorn + AsyncEngine) runs in a subprocess; N concurrent
streaming clients (asyncio + httpx) send the same prompts to /v1/completions (token-id
prompts, greedy, ignore_eos, exactly `--new` tokens each). Time to first token is measured
per request at the client, from sending it to its first streamed token.
Transformers: LlamaForCausalLM on the same weights (the production converter, as in
bench/generate.py) calling `generate` once per prompt (sequential), and in static batches
of `--clients` prompts (left padded). TTFT there is the time to the first streamed token of
the call that holds the prompt, counted from the start of the run for batches (a client
sending all prompts at once waits for the earlier batches) and per call for sequential.

The tokenizer is a stand-in that maps each id to one character (the model is random), so
detokenization is cheap and ids are recoverable from the text: `token_match` compares our
greedy outputs with transformers' sequential ones. One run each (the figures are large
enough to read), a side-by-side table, and the last line one JSON object (also written to
bench/results/serve.json) whose `ratio` = our output tokens/s with N clients / transformers
sequential output tokens/s (the floor we hold ourselves to is 4x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_results  # noqa: E402

FLOOR = 4.0
_BASE = 0x100  # id i <-> chr(_BASE + i): printable, one character per token


class IdTokenizer:
    """Just enough tokenizer for the server and engine: one character per id, invertible."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = 1, 2
        self.im_end_id = self.action_end_id = None
        self.stop_ids = [2]

    def encode(self, text: str, add_bos: bool = True, **_: object) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [ord(c) - _BASE for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(_BASE + int(i)) for i in ids)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(24, 97, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (k - 1,), generator=g).tolist() for k in lens]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# -- our server, in a subprocess ---------------------------------------------------------

def serve(preset: str, port: int, clients: int, session_len: int) -> None:
    import uvicorn

    from internlm2.config import ModelConfig
    from internlm2.engine import AsyncEngine, Engine
    from internlm2.model import build_model
    from internlm2.serve.app import create_app
    config = ModelConfig.preset(preset)
    model = build_model(config, seed=0).eval()
    tok = IdTokenizer(config.vocab_size)
    engine = Engine(model, tok, max_batch_size=clients, session_len=session_len,
                    num_blocks=clients * (session_len // 16 + 1) + 64, eos_token_ids=[2])
    aengine = AsyncEngine(engine)
    aengine.start()
    app = create_app(aengine, tok, model_name="bench", max_tokens_limit=session_len)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client_run(url: str, prompts: list[list[int]], new: int, clients: int) -> dict:
    import httpx
    sem = asyncio.Semaphore(clients)
    ttft: list[float] = []
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": "bench", "prompt": prompts[i], "max_tokens": new, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with sem:
            t0 = time.perf_counter()
            first = None
            text = ""
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for ch in json.loads(line[6:])["choices"]:
                        if ch["text"]:
                            first = first or time.perf_counter()
                            text += ch["text"]
            ttft.append(first - t0)
            outputs[i] = [ord(c) - _BASE for c in text]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one(http, 0)  # warm-up (not timed)
        ttft.clear()
        t = time.perf_counter()
        await asyncio.gather(*[one(http, i) for i in range(len(prompts))])
        dt = time.perf_counter() - t
    n_out = sum(len(o) for o in outputs)
    return {"seconds": dt, "requests_s": len(prompts) / dt, "output_tok_s": n_out / dt,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "output_tokens": n_out, "outputs": outputs}


def run_ours(preset: str, prompts: list[list[int]], new: int, clients: int) -> dict:
    port = free_port()
    session_len = max(len(p) for p in prompts) + new + 16
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(port), "--preset", preset,
                             "--clients", str(clients), "--_session-len", str(session_len)],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        return asyncio.run(_client_run(url, prompts, new, clients))
    finally:
        proc.terminate()
        proc.wait(30)


# -- transformers ---------------------------------------------------------------------------

class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _hf_generate(ref, ids: torch.Tensor, mask: torch.Tensor, new: int, streamer) -> torch.Tensor:
    with torch.inference_mode():
        out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=None, pad_token_id=0,
                           streamer=streamer)
    return out[:, ids.shape[1]:]


def run_hf_sequential(ref, prompts: list[list[int]], new: int) -> dict:
    x = torch.tensor([prompts[0]])
    _hf_generate(ref, x, torch.ones_like(x), 4, None)  # warm-up
    ttft, outs = [], []
    t = time.perf_counter()
    for p in prompts:
        x = torch.tensor([p])
        s = _FirstToken()
        t0 = time.perf_counter()
        outs.append(_hf_generate(ref, x, torch.ones_like(x), new, s)[0].tolist())
        ttft.append(s.first - t0)
    dt = time.perf_counter() - t
    n_out = sum(len(o) for o in outs)
    return {"seconds": dt, "requests_s": len(prompts) / dt, "output_tok_s": n_out / dt,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "output_tokens": n_out, "outputs": outs}


def run_hf_batches(ref, prompts: list[list[int]], new: int, batch: int) -> dict:
    ttft, n_out = [], 0
    t = time.perf_counter()
    for k in range(0, len(prompts), batch):
        group = prompts[k:k + batch]
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(group):  # left padding
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        s = _FirstToken()
        out = _hf_generate(ref, ids, mask, new, s)
        ttft += [s.first - t] * len(group)  # all prompts were sent at the start
        n_out += out.numel()
    dt = time.perf_counter() - t
    return {"seconds": dt, "requests_s": len(prompts) / dt, "output_tok_s": n_out / dt,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "output_tokens": n_out}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="output tokens per request")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (and HF batch)")
    ap.add_argument("--quick", action="store_true", help="16 prompts x 32 tokens")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    ap.add_argument("--_serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_session-len", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve is not None:
        serve(args.preset, args._serve, args.clients, args._session_len)
        return None
    if args.quick:
        args.prompts, args.new = 16, 32

    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    from generate import build_pair  # bench/generate.py: same weights on both sides

    threads = torch.get_num_threads()
    config, ours_model, ref = build_pair(args.preset)
    del ours_model
    prompts = make_prompts(args.prompts, config.vocab_size)

    ours = run_ours(args.preset, prompts, args.new, args.clients)
    seq = run_hf_sequential(ref, prompts, args.new)
    bat = run_hf_batches(ref, prompts, args.new, args.clients)
    match = statistics.mean(
        sum(a == b for a, b in zip(o, r)) / max(len(r), 1)
        for o, r in zip(ours.pop("outputs"), seq.pop("outputs")))

    rows = [(f"ours, {args.clients} clients (HTTP)", ours),
            ("transformers sequential", seq),
            (f"transformers static batch {args.clients}", bat)]
    print(f"{args.prompts} prompts (24-96 tokens) x {args.new} output tokens, greedy, preset "
          f"{args.preset}, {threads} torch threads")
    print(f"{'':<36}{'req/s':>8}{'out tok/s':>11}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}")
    for name, r in rows:
        print(f"{name:<36}{r['requests_s']:>8.2f}{r['output_tok_s']:>11.1f}"
              f"{r['ttft_p50_ms']:>13.1f}{r['ttft_p99_ms']:>13.1f}")
    ratio = ours["output_tok_s"] / seq["output_tok_s"]
    print(f"ours / transformers sequential: {ratio:.2f}x output tokens/s (floor {FLOOR}x); "
          f"ours / static batches: {ours['output_tok_s'] / bat['output_tok_s']:.2f}x; "
          f"greedy token match with transformers: {match:.3f}")
    r2 = lambda d: {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
    results = {"preset": args.preset, "prompts": args.prompts, "new_tokens": args.new,
               "clients": args.clients, "threads": threads, "ours": r2(ours),
               "transformers_sequential": r2(seq), "transformers_static_batch": r2(bat),
               "token_match": round(match, 4), "ratio": round(ratio, 3), "floor": FLOOR,
               "ratio_vs_static_batch": round(ours["output_tok_s"] / bat["output_tok_s"], 3),
               "torch": torch.__version__, "transformers": transformers.__version__}
    return emit_results(results, args.out)


if __name__ == "__main__":
    main()
