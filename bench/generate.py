"""Decode speed: internlm2.generate vs transformers' LlamaForCausalLM.generate, same weights.

    python bench/generate.py [--presets tiny,100m] [--batches 1,8] [--prompt 64] [--new 128]
                             [--repeats 5] [--threads N] [--compiled tiny]

Both sides get the same random prompt, greedy decoding, a fixed number of new tokens (no
stop token) and the same torch threads. The weights are converted with the production
converter (internlm2.hf.to_llama_state_dict / llama_config_dict). Runs alternate between
the two implementations so background load hits both alike. Figures are the best run of
each side (external load on a shared machine only ever slows a run down); the ratio of the
medians is printed beside it.
Tokens/s counts generated tokens over the whole call (prefill included), as a user sees it.

Presets named in --compiled also get an "ours compiled" row at batch 1 (marked *):
`generate(..., compile=True)`, a torch.compile'd decode step over a fixed-size KV cache with
frozen weights, run interleaved with the other two; its first call (the compile) is timed
separately (`compile_s`) and kept out of the figures; `token_match` compares it with
transformers, `token_match_eager` with our eager loop. --threads below the core count helps
on a shared machine: with every core busy, each multi-threaded matmul waits for a
descheduled thread and all figures drop several-fold (the 100m batch-8 "anomaly" was that).

For the 100m preset the batch-1 memory-bandwidth bound is printed too: weight bytes read
per decode step over the measured copy bandwidth. The last line is one JSON object with
every figure; `ratio` = ours (the faster of eager and compiled) / transformers at batch 1 on
the tiny preset (`ratio_eager`, `ratio_compiled`: each row's own). The same JSON is written
to bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internlm2.config import ModelConfig
from internlm2.generate import collect, generate
from internlm2.hf import llama_config_dict
from internlm2.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_results, load_llama_weights  # noqa: E402


def copy_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write counted, STREAM-style)."""
    x = torch.ones(n_bytes // 8, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / min(times)


def decode_weight_bytes(config: ModelConfig, dtype_bytes: int = 4) -> int:
    """Weights one decode step reads: every matrix except the embedding table (one row)."""
    n = config.num_params(embeddings=True) - config.vocab_size * config.hidden_size
    return (n + config.hidden_size) * dtype_bytes


def _cpu_probe() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, this process's CPU seconds, wall time)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # minus idle and iowait
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def _other_cpu_share(start) -> float | None:
    """Fraction of the machine's CPU time other processes used since `start` (Linux only)."""
    end = _cpu_probe()
    if start is None or end is None:
        return None
    wall = end[2] - start[2]
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def build_pair(preset: str):
    import transformers

    config = ModelConfig.preset(preset)
    ours = build_model(config, seed=0).eval()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(llama_config_dict(config)))
    load_llama_weights(ref, ours, config)
    ref.eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = config.pad_token_id
    return config, ours, ref


def run_ours(model, ids: torch.Tensor, new: int, compile: bool = False) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = collect(generate(model, ids, max_new_tokens=new, min_new_tokens=new, stop_ids=[],
                           compile=compile))
    dt = time.perf_counter() - t
    return dt, torch.tensor([c.tokens for c in out])


def run_ref(model, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                             pad_token_id=0)
    dt = time.perf_counter() - t
    return dt, out[:, ids.shape[1]:]


def bench_case(ours, ref, config: ModelConfig, batch: int, prompt: int, new: int,
               repeats: int, compiled: bool = False) -> dict:
    """Interleaved timed runs of ours, transformers and (with `compiled`) ours with
    `compile=True`; the compiled side's first call (the compile) is timed separately."""
    g = torch.Generator().manual_seed(1234 + batch)
    ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=g)
    run_ours(ours, ids, min(new, 8))  # warm up allocators and kernels
    run_ref(ref, ids, min(new, 8))
    compile_s = run_ours(ours, ids, min(new, 8), compile=True)[0] if compiled else None
    t_ours, t_ref, t_comp = [], [], []
    for _ in range(repeats):
        dt, a = run_ours(ours, ids, new)
        t_ours.append(dt)
        dt, b = run_ref(ref, ids, new)
        t_ref.append(dt)
        if compiled:
            dt, c = run_ours(ours, ids, new, compile=True)
            t_comp.append(dt)
    match = float((a == b).float().mean())
    tps = lambda ts, f: round(batch * new / f(ts), 2)
    ours_tps, ref_tps = tps(t_ours, min), tps(t_ref, min)
    r = {"ours_tok_s": ours_tps, "hf_tok_s": ref_tps, "ratio": round(ours_tps / ref_tps, 3),
         "ours_tok_s_median": tps(t_ours, statistics.median),
         "hf_tok_s_median": tps(t_ref, statistics.median),
         "ratio_median": round(tps(t_ours, statistics.median) / tps(t_ref, statistics.median), 3),
         "token_match": round(match, 4)}
    if compiled:
        c_tps = tps(t_comp, min)
        r["compiled"] = {"ours_tok_s": c_tps, "ratio": round(c_tps / ref_tps, 3),
                         "ours_tok_s_median": tps(t_comp, statistics.median),
                         "ratio_median": round(tps(t_comp, statistics.median)
                                               / tps(t_ref, statistics.median), 3),
                         "compile_s": round(compile_s, 2),
                         "token_match": round(float((c == b).float().mean()), 4),
                         "token_match_eager": round(float((c == a).float().mean()), 4)}
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,100m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (tiny)")
    ap.add_argument("--repeats-large", type=int, default=2, help="timed runs per side (100m)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = one per CPU core)")
    ap.add_argument("--compiled", default="tiny",
                    help="presets that also get an 'ours compiled' row at batch 1 "
                         "(generate(..., compile=True)); '' for none")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    results: dict = {"prompt_tokens": args.prompt, "new_tokens": args.new,
                     "repeats": {"tiny": args.repeats, "other": args.repeats_large},
                     "threads": threads,
                     "torch": torch.__version__, "transformers": transformers.__version__}
    rows = []
    probe = _cpu_probe()
    for preset in args.presets.split(","):
        config, ours, ref = build_pair(preset)
        entry: dict = {"params": ours.num_params()}
        for b in (int(x) for x in args.batches.split(",")):
            reps = args.repeats if preset == "tiny" else args.repeats_large
            r = bench_case(ours, ref, config, b, args.prompt, args.new, reps,
                           compiled=b == 1 and preset in args.compiled.split(","))
            entry[f"batch{b}"] = r
            rows.append((preset, b, r))
        if preset == "100m" and "batch1" in entry:
            bw = copy_bandwidth()
            wbytes = decode_weight_bytes(config)
            bound = bw / wbytes
            entry["bandwidth"] = {"copy_GB_s": round(bw / 1e9, 2),
                                  "weight_MB_per_step": round(wbytes / 1e6, 1),
                                  "max_tok_s_batch1": round(bound, 2),
                                  "ours_fraction": round(entry["batch1"]["ours_tok_s"] / bound, 3)}
        results[preset] = entry
        del ours, ref

    print(f"decode tokens/s ({args.prompt} prompt + {args.new} new tokens, greedy, "
          f"{threads} threads, best of {args.repeats} / {args.repeats_large} interleaved runs; "
          f"ratio of medians in brackets)")
    print(f"{'preset':<8}{'batch':>6}{'ours':>10}{'transformers':>14}{'ratio':>8}{'(med)':>8}"
          f"{'match':>7}")
    for preset, b, r in rows:
        med = f"({r['ratio_median']:.2f})"
        print(f"{preset:<8}{b:>6}{r['ours_tok_s']:>10.1f}{r['hf_tok_s']:>14.1f}"
              f"{r['ratio']:>8.2f}{med:>8}{r['token_match']:>7.2f}")
        c = r.get("compiled")
        if c:
            med = f"({c['ratio_median']:.2f})"
            print(f"{preset + '*':<8}{b:>6}{c['ours_tok_s']:>10.1f}{r['hf_tok_s']:>14.1f}"
                  f"{c['ratio']:>8.2f}{med:>8}{c['token_match']:>7.2f}")
    if any("compiled" in r for _, _, r in rows):
        comp = ", ".join(f"{p} {r['compiled']['compile_s']} s" for p, _, r in rows
                         if "compiled" in r)
        print(f"* ours compiled: generate(..., compile=True); first call (compile) not in the "
              f"figures: {comp}")
    bwr = results.get("100m", {}).get("bandwidth")
    if bwr:
        print(f"100m batch-1 bandwidth bound: {bwr['weight_MB_per_step']} MB weights/step at "
              f"{bwr['copy_GB_s']} GB/s copy bandwidth -> {bwr['max_tok_s_batch1']} tok/s max; "
              f"ours reaches {bwr['ours_fraction']:.0%}")
    other = _other_cpu_share(probe)
    if other is not None:
        results["other_processes_cpu_share"] = round(other, 3)
        if other > 0.1:
            print(f"warning: other processes used {other:.0%} of the CPUs during the run; "
                  f"the figures are unreliable, rerun on an idle machine")
    if "tiny" in results and "batch1" in results["tiny"]:
        # The floor's figure: our faster decode path (compile time reported apart), as
        # bench/train.py takes our faster variant.
        b1 = results["tiny"]["batch1"]
        results["ratio_eager"] = b1["ratio"]
        results["ratio"] = b1["ratio"]
        if "compiled" in b1:
            results["ratio_compiled"] = b1["compiled"]["ratio"]
            results["ratio"] = max(b1["ratio"], b1["compiled"]["ratio"])
    return emit_results(results, args.out)


if __name__ == "__main__":
    main()
