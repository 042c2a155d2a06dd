"""Long-context prefill: time and peak memory against context length, ours vs transformers.

    python bench/longctx.py [--lengths 1024,...,131072] [--chunk 2048] [--quick]
                            [--threads N] [--point-timeout S] [--mem-limit-gb G] [--out PATH]

Both sides hold the same weights: the `tiny` preset built with seed 0, converted for
transformers' LlamaForCausalLM by the production converter (internlm2.hf.to_llama_state_dict /
llama_config_dict), attn_implementation="sdpa", float32, batch 1, a random prompt.

- ours: `internlm2.generate.generate(..., prefill_chunk=--chunk, max_new_tokens=1)`, the
  path the NIAH eval uses: a KV cache sized for the prompt, the prompt fed in chunks with
  logits only for the last position. Memory should be weights + KV cache + a workspace set
  by the chunk alone: a chunk after cached keys attends with two maskless flash calls (the
  cached keys, then the chunk causally) merged by log-sum-exp, so no [chunk, context] mask
  or score matrix is ever built (internlm2.model._sdpa_after).
- transformers: one `model(ids, use_cache=True, logits_to_keep=1)` over the whole context,
  as a transformers user prefills; every activation is [T, ...] at once.

Rotary: the bench raises `max_position_embeddings` to the largest length measured (plain
RoPE, theta unchanged) on both sides, so no rope scaling is involved and both compute the
same function at every length (positions below the preset's 32768 are unaffected).

Every (implementation, length) point runs in a fresh subprocess, so its peak RSS is its
own. Reported per point: prefill wall time, `peak_delta_mb` = the child's peak RSS minus
its RSS just before the prefill, the absolute peak, and the analytical KV cache size.
The peak is the kernel's high-water mark VmHWM, reset (/proc/self/clear_refs, "5") just
before the prefill: ru_maxrss itself is recorded too, but in a fork+exec child it starts at
the parent's RSS at fork time (~0.5 GB here), which hides every peak below it. The
parent watches each child's RSS and kills it past --mem-limit-gb (recorded "OOM", as is an
allocation failure inside the child); a child past --point-timeout is recorded "timeout",
and larger lengths of that implementation are then skipped (recorded "skipped").

Before the points, a correctness check at a small length (chunked so that several chunks
run) compares ours' last-position logits with transformers' (max abs diff printed).
The last line is one JSON object (also written to bench/results/longctx.json) with every
point, `ratio` = transformers peak delta / ours peak delta at the largest length both
finished, and `linear_fit` of ours' peak delta against length (MB per 1k tokens, R^2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internlm2.config import ModelConfig  # noqa: E402
from internlm2.generate import collect, generate  # noqa: E402
from internlm2.hf import llama_config_dict  # noqa: E402
from internlm2.model import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_results, load_llama_weights  # noqa: E402

PRESET = "tiny"
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536,131072"
QUICK_LENGTHS = "1024,2048,4096,8192"
MB = 1 << 20


# -- memory probes ---------------------------------------------------------------------------

def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (VmRSS), in bytes; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def ru_maxrss_bytes() -> int:
    """getrusage's peak RSS (KiB on Linux). In a child started by fork+exec it can carry the
    parent's RSS at fork time, which hides small peaks; hence `reset_peak`/`peak_rss_bytes`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's own RSS high-water mark (VmHWM), or ru_maxrss where /proc lacks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return ru_maxrss_bytes()


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype_bytes: int = 4) -> int:
    """Keys + values for `tokens` positions over every layer (batch 1)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim \
        * tokens * dtype_bytes


def bench_config(max_len: int) -> ModelConfig:
    """The tiny preset with room for `max_len` positions (plain RoPE, see the docstring)."""
    config = ModelConfig.preset(PRESET)
    if max_len > config.max_position_embeddings:
        config = config.replace(max_position_embeddings=max_len)
    return config


# -- the two implementations ---------------------------------------------------------------------

def build_ours(config: ModelConfig):
    return build_model(config, seed=0).eval()


def build_theirs(config: ModelConfig, ours=None):
    """transformers' LlamaForCausalLM holding `ours`' weights (built from seed 0 if not given)."""
    import transformers

    transformers.logging.set_verbosity_error()
    ours = ours if ours is not None else build_ours(config)
    hf_cfg = transformers.LlamaConfig.from_dict(llama_config_dict(config))
    hf_cfg._attn_implementation = "sdpa"
    ref = transformers.LlamaForCausalLM(hf_cfg)
    load_llama_weights(ref, ours, config)
    return ref.eval()


def prompt_ids(config: ModelConfig, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(3, config.vocab_size, (1, length), generator=g)


def prefill_ours(model, ids: torch.Tensor, chunk: int) -> int:
    """Chunked prefill through the public generate path (one new token); returns that token."""
    out = collect(generate(model, ids[0].tolist(), max_new_tokens=1, prefill_chunk=chunk,
                           stop_ids=[]))
    return int(out[0].tokens[0])


def prefill_theirs(model, ids: torch.Tensor):
    """One forward over the whole context with a cache, logits for the last position only."""
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
    return out


def ours_last_logits(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The exact prefill loop of generate._generate, with the last-position logits returned."""
    t = ids.shape[1]
    with torch.inference_mode():
        cache = model.new_cache(1, t + 1)
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            out = model(ids[:, s:e], cache=cache, logits_to_keep=1, rope_seq_len=t,
                        return_hidden=e < t)
    return out[:, -1].float()


def check_correctness(length: int, chunk: int) -> dict:
    config = bench_config(length)
    ours = build_ours(config)
    theirs = build_theirs(config, ours)
    ids = prompt_ids(config, length)
    a = ours_last_logits(ours, ids, chunk)
    b = prefill_theirs(theirs, ids).logits[:, -1].float()
    tok = prefill_ours(ours, ids, chunk)
    diff = float((a - b).abs().max())
    return {"length": length, "chunk": chunk, "max_abs_diff": diff,
            "logit_scale": float(b.abs().max()), "ok": diff < 1e-3,
            "greedy_token_match": tok == int(b.argmax(-1))}


# -- one point (child process) ---------------------------------------------------------------

def run_point(impl: str, length: int, chunk: int, max_len: int) -> dict:
    """Measure one prefill in this (fresh) process."""
    config = bench_config(max_len)
    ids = prompt_ids(config, length)
    if impl == "ours":
        model = build_ours(config)
        prefill_ours(model, prompt_ids(config, min(length, 64)), chunk)  # warm-up, tiny
    else:
        model = build_theirs(config)
        prefill_theirs(model, prompt_ids(config, min(length, 64)))
    import gc
    gc.collect()
    ru0, hwm_reset = ru_maxrss_bytes(), reset_peak()
    rss0 = rss_bytes()
    t = time.perf_counter()
    if impl == "ours":
        prefill_ours(model, ids, chunk)
    else:
        out = prefill_theirs(model, ids)
        del out
    dt = time.perf_counter() - t
    peak, ru = peak_rss_bytes(), ru_maxrss_bytes()
    return {"status": "ok", "time_s": round(dt, 3), "rss_before_mb": round(rss0 / MB, 1),
            "peak_mb": round(peak / MB, 1), "peak_delta_mb": round((peak - rss0) / MB, 1),
            "hwm_reset": hwm_reset, "ru_maxrss_before_mb": round(ru0 / MB, 1),
            "ru_maxrss_mb": round(ru / MB, 1)}


def _child_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.mem_limit_gb:
        # Backstop to the parent's RSS watch: an allocation past it fails instead of swapping.
        lim = int((args.mem_limit_gb + 8) * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        r = run_point(args.child, args.length, args.chunk, args.max_len)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower():
            raise
        r = {"status": "OOM", "error": str(e)[:200]}
    print("RESULT " + json.dumps(r), flush=True)


# -- parent: spawn, watch, tabulate ----------------------------------------------------------------

def spawn_point(impl: str, length: int, args: argparse.Namespace, max_len: int) -> dict:
    """Run one point in a fresh interpreter, killing it past the time or memory limit."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--length",
           str(length), "--chunk", str(args.chunk), "--max-len", str(max_len), "--threads",
           str(args.threads), "--mem-limit-gb", str(args.mem_limit_gb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = args.mem_limit_gb * (1 << 30)
    start, watched_peak, status = time.monotonic(), 0, None
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        watched_peak = max(watched_peak, rss)
        if rss > limit:
            status = "OOM"
        elif time.monotonic() - start > args.point_timeout:
            status = "timeout"
        if status:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if status:
        return {"status": status, "elapsed_s": round(time.monotonic() - start, 1),
                "watched_peak_mb": round(watched_peak / MB, 1)}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"status": "error", "returncode": proc.returncode, "stderr": err[-800:]}


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares y = a + b x; slope reported per 1k tokens, with R^2."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"slope_mb_per_1k_tokens": round(b * 1000, 3), "intercept_mb": round(a, 1),
            "r2": round(1 - ss_res / ss_tot, 5) if ss_tot else 1.0, "points": n}


def _fmt(p: dict, key: str, spec: str) -> str:
    return format(p[key], spec) if p.get("status") == "ok" else p.get("status", "-")


def parse_lengths(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not out or out[0] <= 0:
        raise ValueError(f"--lengths must be positive integers, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS)
    ap.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}")
    ap.add_argument("--chunk", type=int, default=2048, help="ours' prefill chunk (tokens)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--point-timeout", type=float, default=600.0,
                    help="seconds per (implementation, length) point")
    ap.add_argument("--mem-limit-gb", type=float, default=14.0, help="RSS cap per point")
    ap.add_argument("--check-length", type=int, default=1024,
                    help="length of the logits correctness check (chunk = length / 4)")
    ap.add_argument("--impls", default="ours,theirs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "longctx.json"))
    ap.add_argument("--child", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child:
        _child_main(args)
        return None
    if args.chunk <= 0:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    lengths = parse_lengths(QUICK_LENGTHS if args.quick else args.lengths)
    impls = [i for i in args.impls.split(",") if i]
    if not set(impls) <= {"ours", "theirs"}:
        raise ValueError(f"--impls must name ours and/or theirs, got {args.impls!r}")
    max_len = max(lengths) + 1  # + the one generated token's cache slot
    torch.set_num_threads(args.threads)
    import transformers

    check = check_correctness(args.check_length, max(1, args.check_length // 4))
    print(f"correctness at {check['length']} tokens (chunk {check['chunk']}): last-position "
          f"logits max abs diff {check['max_abs_diff']:.2e} (|logits| up to "
          f"{check['logit_scale']:.2f}), greedy token match {check['greedy_token_match']}",
          flush=True)

    config = bench_config(max_len)
    weights_mb = config.num_params() * 4 / MB
    points: list[dict] = []
    dead: dict[str, str] = {}
    for length in lengths:
        row = {"length": length, "kv_mb": round(kv_cache_bytes(config, length) / MB, 1)}
        for impl in impls:
            if impl in dead:
                r = {"status": "skipped", "why": f"{dead[impl]} at a smaller length"}
            else:
                r = spawn_point(impl, length, args, max_len)
                if r["status"] != "ok":
                    dead[impl] = r["status"]
            if r.get("status") == "ok":
                r["minus_kv_mb"] = round(r["peak_delta_mb"] - row["kv_mb"], 1)
            row[impl] = r
            print(f"  {impl:<7}{length:>8}: {json.dumps(r)}", file=sys.stderr, flush=True)
        points.append(row)

    print(f"\nprefill of the {PRESET} preset ({config.num_params() / 1e6:.1f}M params, "
          f"{weights_mb:.0f} MB fp32), {args.threads} threads; ours chunk {args.chunk}; "
          "peak = VmHWM (reset just before) - RSS before prefill")
    print(f"{'length':>8}{'KV MB':>8}{'ours s':>9}{'ours MB':>9}{'-KV':>8}"
          f"{'theirs s':>10}{'theirs MB':>11}{'ratio':>7}")
    for row in points:
        o, t = row.get("ours", {}), row.get("theirs", {})
        ratio = (f"{t['peak_delta_mb'] / o['peak_delta_mb']:.1f}"
                 if o.get("status") == t.get("status") == "ok" else "-")
        print(f"{row['length']:>8}{row['kv_mb']:>8.0f}{_fmt(o, 'time_s', '.2f'):>9}"
              f"{_fmt(o, 'peak_delta_mb', '.0f'):>9}{_fmt(o, 'minus_kv_mb', '.0f'):>8}"
              f"{_fmt(t, 'time_s', '.2f'):>10}{_fmt(t, 'peak_delta_mb', '.0f'):>11}{ratio:>7}")

    both = [r for r in points if r.get("ours", {}).get("status") == "ok"
            and r.get("theirs", {}).get("status") == "ok"]
    ratio = None
    if both:
        last = both[-1]
        ratio = {"length": last["length"],
                 "value": round(last["theirs"]["peak_delta_mb"] / last["ours"]["peak_delta_mb"], 3)}
    ok_ours = [r for r in points if r.get("ours", {}).get("status") == "ok"]
    fit = linear_fit([r["length"] for r in ok_ours], [r["ours"]["peak_delta_mb"] for r in ok_ours])
    kv_slope = kv_cache_bytes(config, 1000) / MB
    if fit:
        print(f"ours peak vs length: {fit['slope_mb_per_1k_tokens']:.2f} MB per 1k tokens "
              f"(KV cache alone {kv_slope:.2f}), intercept {fit['intercept_mb']:.0f} MB, "
              f"R^2 {fit['r2']:.4f}")
    if ratio:
        print(f"ratio transformers / ours peak memory at {ratio['length']}: {ratio['value']:.2f}")
    results = {"preset": PRESET, "params": config.num_params(), "weights_mb": round(weights_mb, 1),
               "chunk": args.chunk, "threads": args.threads, "point_timeout_s": args.point_timeout,
               "mem_limit_gb": args.mem_limit_gb,
               "rope": f"plain RoPE, max_position_embeddings raised to {config.max_position_embeddings}",
               "kv_mb_per_1k_tokens": round(kv_slope, 3), "correctness": check,
               "points": points, "ratio": ratio, "linear_fit": fit,
               "torch": torch.__version__, "transformers": transformers.__version__}
    return emit_results(results, args.out)


if __name__ == "__main__":
    main()
