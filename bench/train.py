"""Training throughput: internlm2's train step vs transformers' LlamaForCausalLM, same weights.

    python bench/train.py [--quick] [--steps 5] [--warmup 2] [--rounds 1] [--variants ...]
    python bench/train.py --gpu            # where CUDA is available: the 1.8B preset, bf16, 4k

One model shape (default ~16M parameters: vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV
heads, FFN 1024), one batch (8 x 512 random tokens, the same every step), fp32, AdamW
(lr 3e-4, betas 0.9 / 0.95, eps 1e-8, weight decay 0.1), on the CPU with torch pinned to the
machine's core count. Variants, each in its own fresh process (so the memory peaks do not
mix and one compile cache never serves another):

  ours-eager           internlm2.train.loop.train_step (the project's real step: target
                       count, fused_causal_lm_loss, backward, clip 1.0, AdamW from build_optimizer)
  ours-compile-block   the same step after internlm2.train.parallel.apply_compile (per block,
                       what `internlm2 pretrain` does with compile on)
  ours-compile-model   the same step with torch.compile(model) (whole model; loss eager)
  hf-eager             LlamaForCausalLM (attn_implementation="sdpa") in a plain loop:
                       model(input_ids, labels=...).loss, backward, AdamW step, zero_grad
  hf-compile           the same with torch.compile(model)
  ours-compile-loss    (only with --variants) the step with torch.compile(fused_causal_lm_loss) as
                       its loss_fn: model and loss in one graph, as in HF's compiled forward

The transformers model is built from llama_config_dict(config) and loaded with
to_llama_state_dict(ours.state_dict()) (the production converter), so both sides start from
the same weights; both see the same labels (HF shifts inside its loss, ours gets them
shifted), so the step-0 losses must agree (checked to 1e-4 for every variant).

Per variant: `--warmup` steps (the first one compiles), then `--steps` timed steps; step time
is their median. The processes are started, built and warmed up one at a time (compilation
alone on the machine), then stay alive and take turns: one timed step of each variant per
round, with a rotating start (--schedule interleaved, the CPU default), so background load
hits every variant alike; --schedule sequential runs one variant to the end before the next
(the --gpu default: one 1.8B model at a time in GPU memory).

tokens/s = batch * seq / step time. MFU = flops_per_token(config, seq) * tokens/s over the
fp32 GEMM peak the script measures: a 2048^2 matmul, median of 7 repeats,
at the start; each run also times that GEMM before every timed step and after the last one
(48 MiB of probe matrices, in every variant's memory alike), and the peak is the highest of
these medians (a start under heavier background load would otherwise overstate MFU).
Compile time = wall time of the warmup steps minus as many steady steps (reported apart,
with a fresh inductor cache). Peak memory = the resident-set high-water mark of the variant's
process over the timed steps (reset after warmup through /proc/self/clear_refs where Linux
allows it; otherwise the whole-process ru_maxrss, which then includes compilation). With
--rounds R all that is repeated R times with fresh processes and each variant's fastest run
counts. The default run (one round) takes about 4 to 5 minutes on this 2-core machine.

Last line: one JSON object with every figure; `ratio` = ours' best tokens/s (eager or any
compiled variant) over the faster transformers variant (the acceptance floor is 1.1). The
same JSON is written to bench/results/train.json (--quick: only with --out).

MFU now: the same figure against the median GEMM rate of the variant's own probes around its
timed steps (under background load the machine's rate moves; `ratio_load_adjusted` in the
JSON compares these, mostly of use with --schedule sequential). `ratio_best_step`: the same
ratio on each side's fastest single timed step (load only ever slows a step down). A "+R" beside a compile time: torch.compile compiled a new graph during
the timed steps (a recompile after the warmup).

Threads: torch, OpenMP and MKL are pinned to --threads (default: the core count), and the runs
use OMP_WAIT_POLICY=PASSIVE by default. With the default (spinning) policy on a machine where
other processes hold cores, every parallel region waits for a descheduled worker thread: on
this 2-core machine with one other busy process a 0.9M-parameter step went from 0.03 s to
1.5 s, for ours and transformers alike (eager suffers most: many small parallel regions).
--omp-wait default restores the library default.

--gpu (CUDA only): the 1.8B preset at 4096 tokens, batch 1, bf16 autocast over fp32 master
weights, activation checkpointing on every layer (--gpu-ac), ours eager and per-block
compiled, then transformers (gradient checkpointing, sdpa) when memory allows; MFU against
989 TFLOP/s (H100/H200 dense bf16) and against a measured bf16 GEMM peak. Peak memory there is
torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_results, load_llama_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT_TAG = "@@bench-train-result "
CPU_VARIANTS = ["ours-eager", "ours-compile-block", "ours-compile-model", "hf-eager", "hf-compile"]
# Not run by default: the whole project step's forward and loss in one graph, as HF's compiled
# forward (whose loss sits inside the model) is.
EXTRA_VARIANTS = ["ours-compile-loss"]
GPU_VARIANTS = ["ours-eager", "ours-compile-block", "hf-eager"]
H100_BF16_DENSE = 989e12

DIMS = {"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024,
        "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2}
QUICK_DIMS = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 352,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


# ----------------------------------------------------------------------------- helpers

def gemm_peak(device: str = "cpu", dtype=None, n: int | None = None, repeats: int = 7) -> dict:
    """FLOP/s of a large square matmul: median (used for MFU) and best of `repeats`."""
    import torch

    dtype = dtype or torch.float32
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    inner = 10 if device == "cuda" else 1
    for _ in range(2):
        torch.mm(a, b, out=c)
    sync()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync()
        rates.append(inner * 2 * n ** 3 / (time.perf_counter() - t))
    return {"n": n, "median": statistics.median(rates), "best": max(rates)}


def _proc_status(field: str) -> int | None:
    """A VmXXX field of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's VmHWM (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _proc_status("VmHWM"), _proc_status("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss * 1.05 + (16 << 20)


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _cpu_probe():
    """(busy CPU seconds of the machine, CPU seconds of this process and its children, wall)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()


def _other_cpu_share(start) -> float | None:
    end = _cpu_probe()
    if start is None or end is None or end[2] <= start[2]:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / ((end[2] - start[2]) * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------- worker

def _make_batch(config, batch: int, seq: int, device: str):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # ours takes shifted labels; HF shifts `ids` itself
    return ids.to(device), labels.to(device)


def _build_hf(config, ours, device: str):
    import torch
    import transformers

    from internlm2.hf import llama_config_dict

    transformers.logging.set_verbosity_error()
    lc = transformers.LlamaConfig.from_dict(llama_config_dict(config))
    lc.use_cache = False
    with torch.device(device):
        ref = transformers.LlamaForCausalLM._from_config(lc, attn_implementation="sdpa",
                                                         dtype=torch.float32)
    load_llama_weights(ref, ours, config)
    return ref


class _Variant:
    """One variant inside its worker process: build, warm up, timed steps, figures."""

    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(spec["threads"])
        warnings.filterwarnings("ignore")
        from internlm2.config import ModelConfig
        from internlm2.model import build_model
        from internlm2.train import loop
        from internlm2.train.parallel import apply_ac, apply_compile

        self.spec, self.torch = spec, torch
        variant, device = spec["variant"], spec["device"]
        self.cuda = device == "cuda"
        amp = torch.bfloat16 if spec.get("bf16") else None
        self.config = config = (
            ModelConfig.preset(spec["preset"], **spec.get("overrides", {})) if spec.get("preset")
            else ModelConfig(**spec["dims"]))
        self.rss_start = _proc_status("VmRSS")

        ours = build_model(config, device=device, seed=0)
        ids, labels = _make_batch(config, spec["batch"], spec["seq"], device)
        if variant.startswith("ours"):
            model = ours
            if spec.get("ac"):
                apply_ac(model, spec["ac"])
            if variant == "ours-compile-block":
                apply_compile(model)
            elif variant == "ours-compile-model":
                model = torch.compile(model)
            loss_fn = loop.fused_causal_lm_loss  # as internlm2 pretrain
            if variant == "ours-compile-loss":
                loss_fn = torch.compile(loop.fused_causal_lm_loss)
            opt = loop.build_optimizer(model, lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8,
                                       weight_decay=0.1, fused=True)  # as internlm2 pretrain
            micro = [{"input_ids": ids, "labels": labels}]

            def step() -> float:
                return loop.train_step(model, opt, micro, loss_fn, max_norm=1.0,
                                       autocast_dtype=amp, device=device).loss
        else:
            model = _build_hf(config, ours, device)
            del ours
            if spec.get("ac"):
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            fwd = torch.compile(model) if variant == "hf-compile" else model
            opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95),
                                    eps=1e-8, weight_decay=0.1)
            labels_hf = ids.clone()  # HF shifts: the target of position t is ids[t + 1]

            def step() -> float:
                ctx = torch.autocast(device, dtype=amp) if amp is not None else _null()
                with ctx:
                    loss = fwd(input_ids=ids, labels=labels_hf, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss.detach())

        self._step = step
        self.probe = None if self.cuda else _GemmProbe()
        self.rss_ready = _proc_status("VmRSS")
        self.warm_times: list[float] = []
        self.times: list[float] = []
        self.losses: list[float] = []
        self.probes: list[float] = []
        self.reset_ok = False
        self.graphs_after_warmup: int | None = None

    def _timed_call(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        t = time.perf_counter()
        self.losses.append(self._step())
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t

    def warmup(self) -> dict:
        for _ in range(self.spec["warmup"]):
            self.warm_times.append(self._timed_call())
        self.graphs_after_warmup = _graphs()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.reset_ok = _reset_rss_peak()
        return {"event": "ready", "warm_times": self.warm_times}

    def step(self) -> dict:
        if self.probe is not None:
            self.probes.append(self.probe())
        self.times.append(self._timed_call())
        return {"event": "step", "t": self.times[-1], "loss": self.losses[-1]}

    def finish(self) -> dict:
        torch, spec = self.torch, self.spec
        graphs = _graphs()
        step_s = statistics.median(self.times)
        warm = self.warm_times
        out = {"variant": spec["variant"], "params": self.config.num_params(),
               "step_s": step_s, "step_s_min": min(self.times),
               "step_s_all": [round(x, 4) for x in warm + self.times],
               "tokens_per_s": spec["batch"] * spec["seq"] / step_s,
               "warmup_s": sum(warm), "compile_s": max(0.0, sum(warm) - len(warm) * step_s),
               "loss0": self.losses[0], "loss_last": self.losses[-1], "compiled_graphs": graphs,
               # A graph compiled during the timed steps (a recompile): its step is in the
               # median's sample, compile_s misses it and the memory peak includes it.
               "recompiled_in_timed_steps": graphs > (self.graphs_after_warmup or 0)}
        if self.cuda:
            out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_mem_kind"] = "cuda max_memory_allocated (timed steps)"
            return out
        hwm, proc_peak = _proc_status("VmHWM"), _ru_maxrss_bytes()
        if self.reset_ok and hwm is not None:
            out["peak_mem_bytes"] = hwm
            out["peak_mem_kind"] = "RSS high-water mark over the timed steps"
        else:
            out["peak_mem_bytes"] = proc_peak
            out["peak_mem_kind"] = "whole-process ru_maxrss (includes compilation)"
        out["process_peak_rss_bytes"] = proc_peak
        out["rss_start_bytes"] = self.rss_start
        out["rss_ready_bytes"] = self.rss_ready
        self.probes.append(self.probe())
        # The GEMM rate around every timed step: how much of the machine this run had.
        out["gemm_now"] = statistics.median(self.probes)
        out["gemm_probes"] = self.probes
        return out


def worker_main(spec: dict) -> None:
    """The worker process: build and warm up, then obey `step` / `finish` lines on stdin."""

    def emit(obj: dict) -> None:
        sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
        sys.stdout.flush()

    v = _Variant(spec)
    emit(v.warmup())
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            emit(v.step())
        elif cmd == "finish":
            emit(v.finish())
            return


def _graphs() -> int:
    """Graphs torch.compile has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


class _GemmProbe:
    """A short fp32 GEMM timing (2048^2, best of 2) taken between timed steps."""

    def __init__(self, n: int = 2048):
        import torch

        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.c = torch.empty(n, n)

    def __call__(self) -> float:
        import torch

        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            torch.mm(self.a, self.b, out=self.c)
            best = max(best, 2 * self.n ** 3 / (time.perf_counter() - t))
        return best


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _thread_env(env: dict, threads: int, omp_wait: str) -> dict:
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if omp_wait != "default":
        env["OMP_WAIT_POLICY"] = omp_wait.upper()
    else:
        env.pop("OMP_WAIT_POLICY", None)
    return env


class WorkerProcess:
    """A variant's worker in a fresh interpreter with its own (empty) inductor cache, driven
    line by line (so several can take turns at the machine, one step at a time)."""

    def __init__(self, spec: dict, timeout: float):
        self.spec, self.timeout, self.variant = spec, timeout, spec["variant"]
        env = _thread_env(dict(os.environ), spec["threads"], spec["omp_wait"])
        env["TOKENIZERS_PARALLELISM"] = "false"
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self._tmp.name, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(self._tmp.name, "triton")
        self._err = open(os.path.join(self._tmp.name, "stderr.txt"), "w+")  # noqa: SIM115
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.error: str | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                self._lines.put(json.loads(line[len(RESULT_TAG):]))
        self._lines.put(None)  # end of output

    def _fail(self, why: str) -> None:
        if self.error is None:
            self._err.flush()
            self._err.seek(0)
            tail = self._err.read().strip().splitlines()[-12:]
            self.error = why + (": " + " | ".join(tail) if tail else "")
        self.close()

    def request(self, cmd: str | None) -> dict | None:
        """Send `cmd` (None: only wait for the next message); the reply, or None on failure."""
        if self.error is not None:
            return None
        try:
            if cmd is not None:
                self.proc.stdin.write(cmd + "\n")
                self.proc.stdin.flush()
            msg = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self._fail(f"no answer within {self.timeout:.0f}s")
            return None
        except (BrokenPipeError, OSError):
            msg = None
        if msg is None:
            self.proc.wait()
            self._fail(f"worker exited with status {self.proc.returncode}")
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()
        self._tmp.cleanup()


def run_variants(specs: list[dict], steps: int, timeout: float, interleave: bool,
                 verbose: bool = False, log=print) -> list[dict]:
    """Run every spec: build + warmup one after another (compilation alone on the machine),
    then the timed steps, taking turns one step at a time when `interleave` (all the
    processes stay alive; background load then hits every variant alike) or one variant
    after another otherwise. Returns each variant's figures, or {"variant", "error"}."""
    done: dict[int, dict] = {}
    live: dict[int, WorkerProcess] = {}

    def ready(i: int, w: WorkerProcess) -> bool:
        msg = w.request(None)
        if msg is None:
            done[i] = {"variant": w.variant, "error": w.error}
            return False
        log(f"  {w.variant}: ready after {time.perf_counter() - w.t0:.1f}s (warmup steps "
            + ", ".join(f"{t:.2f}s" for t in msg["warm_times"]) + ")")
        return True

    def step(i: int, w: WorkerProcess, s: int) -> bool:
        msg = w.request("step")
        if msg is None:
            done[i] = {"variant": w.variant, "error": w.error}
            return False
        if verbose:
            log(f"    step {s} {w.variant}: {msg['t']:.3f}s, loss {msg['loss']:.5f}")
        return True

    def finish(i: int, w: WorkerProcess) -> None:
        msg = w.request("finish")
        if msg is None:
            done[i] = {"variant": w.variant, "error": w.error}
            return
        msg["process_wall_s"] = time.perf_counter() - w.t0
        done[i] = msg
        w.close()

    try:
        if not interleave:
            for i, spec in enumerate(specs):
                w = live[i] = WorkerProcess(spec, timeout)
                if ready(i, w) and all(step(i, w, s) for s in range(steps)):
                    finish(i, w)
                live.pop(i).close()
            return [done[i] for i in range(len(specs))]
        for i, spec in enumerate(specs):
            w = WorkerProcess(spec, timeout)
            if ready(i, w):
                live[i] = w
        for s in range(steps):
            order = sorted(live)
            order = order[s % len(order):] + order[:s % len(order)] if order else order
            for i in order:  # a rotating start, so no variant always follows the same one
                if not step(i, live[i], s):
                    del live[i]
        for i in sorted(live):
            finish(i, live.pop(i))
    finally:
        for w in live.values():
            w.close()
    return [done[i] for i in range(len(specs))]


# ----------------------------------------------------------------------------- report

def _pick(value, default):
    """An option's value, or `default` when not given (so `--warmup 0` is kept)."""
    return default if value is None else value


def _mib(b) -> str:
    return f"{b / 2 ** 20:.0f}" if b else "-"


def summarise(results: dict[str, list[dict]], fpt: float, peak: float) -> dict[str, dict]:
    """Per variant: the fastest successful run, with MFU."""
    from internlm2.train.loop import mfu

    best = {}
    for v, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            best[v] = {"error": runs[-1]["error"] if runs else "not run"}
            continue
        r = dict(min(ok, key=lambda x: x["step_s"]))
        r["mfu"] = mfu(fpt, r["tokens_per_s"], peak)
        if r.get("gemm_now"):  # against the GEMM rate of the same process, around its steps
            r["mfu_vs_gemm_now"] = mfu(fpt, r["tokens_per_s"], r["gemm_now"])
        r["runs"] = len(ok)
        if len(ok) > 1:
            r["tokens_per_s_all_runs"] = [round(x["tokens_per_s"], 1) for x in ok]
        best[v] = r
    return best


def print_table(best: dict[str, dict], title: str, ref_loss: float | None) -> None:
    print(title)
    print(f"{'variant':<20}{'tok/s':>9}{'step s':>8}{'MFU':>7}{'MFU now':>9}{'peak MiB':>10}"
          f"{'compile s':>11}{'loss0':>10}{'d loss0':>10}")
    for v, r in best.items():
        if "error" in r:
            print(f"{v:<20}  failed: {r['error'][:200]}")
            continue
        dl = f"{abs(r['loss0'] - ref_loss):.1e}" if ref_loss is not None else "-"
        comp = f"{r['compile_s']:.1f}" if "compile" in v else "-"
        if r.get("recompiled_in_timed_steps"):
            comp += "+R"
        now = f"{r['mfu_vs_gemm_now']:.1%}" if "mfu_vs_gemm_now" in r else "-"
        print(f"{v:<20}{r['tokens_per_s']:>9.1f}{r['step_s']:>8.3f}{r['mfu']:>7.1%}{now:>9}"
              f"{_mib(r['peak_mem_bytes']):>10}{comp:>11}{r['loss0']:>10.5f}{dl:>10}")


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 6) if abs(obj) < 1e3 else round(obj, 1)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke run")
    ap.add_argument("--gpu", action="store_true", help="CUDA: the 1.8B preset, bf16, 4k context")
    ap.add_argument("--variants", default=None, help="comma list (default: all of the mode)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (compile) per run")
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--omp-wait", choices=["passive", "active", "default"], default="passive",
                    help="OMP_WAIT_POLICY of the runs (see the module docstring)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--gpu-ac", type=float, default=1.0, help="AC ratio of the GPU run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant run")
    ap.add_argument("--out", default=None,
                    help="JSON file (default bench/results/train.json; none with --quick)")
    ap.add_argument("--schedule", choices=["interleaved", "sequential"], default=None,
                    help="timed steps taking turns across the variants' processes (default on "
                         "the CPU) or one variant after another (default with --gpu)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per timed step")
    args = ap.parse_args(argv)

    if args.worker:
        worker_main(json.loads(args.worker))
        return {}

    warnings.filterwarnings("ignore")
    _thread_env(os.environ, args.threads, args.omp_wait)  # before OpenMP starts (import torch)
    import torch
    import transformers

    from internlm2.config import ModelConfig
    from internlm2.model import flops_per_token
    from internlm2.train.loop import measure_peak_flops

    torch.set_num_threads(args.threads)
    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        print("--gpu: CUDA is not available here; running the CPU benchmark instead",
              file=sys.stderr)
        gpu = False

    if gpu:
        config = ModelConfig.preset("1_8b")
        dims, preset = None, "1_8b"
        batch, seq = _pick(args.batch, 1), _pick(args.seq, 4096)
        steps, warmup = _pick(args.steps, 10), _pick(args.warmup, 3)
        variants = args.variants.split(",") if args.variants else GPU_VARIANTS
    else:
        dims, preset = (QUICK_DIMS if args.quick else DIMS), None
        config = ModelConfig(**dims)
        batch = _pick(args.batch, 2 if args.quick else 8)
        seq = _pick(args.seq, 128 if args.quick else 512)
        steps = _pick(args.steps, 3 if args.quick else 5)
        warmup = _pick(args.warmup, 2)
        variants = args.variants.split(",") if args.variants else CPU_VARIANTS
    if steps < 1 or warmup < 0 or args.rounds < 1:
        ap.error("need --steps >= 1, --warmup >= 0 and --rounds >= 1")
    unknown = set(variants) - set(CPU_VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {CPU_VARIANTS + EXTRA_VARIANTS}")

    fpt = flops_per_token(config, seq)
    device = "cuda" if gpu else "cpu"
    cpu_probe = _cpu_probe()
    t_start = time.perf_counter()
    if gpu:
        g = gemm_peak("cuda", torch.bfloat16)
        torch.cuda.empty_cache()  # the runs are other processes on the same GPU
        peak = g["median"]
        peak_info = {"gemm_bf16_median": g["median"], "gemm_bf16_best": g["best"], "n": g["n"],
                     "reference_bf16_dense": H100_BF16_DENSE,
                     "device_name": torch.cuda.get_device_name()}
    else:
        g = gemm_peak("cpu", torch.float32)
        peak = g["median"]
        peak_info = {"gemm_fp32_median": g["median"], "gemm_fp32_best": g["best"], "n": g["n"],
                     "loop_measure_peak_flops": measure_peak_flops("cpu", torch.float32,
                                                                   cache=False)}
    n_params = config.num_params()
    print(f"model: {n_params:,} parameters ({config.num_params(embeddings=False):,} without "
          f"embeddings), {'preset ' + preset if preset else dims}; batch {batch} x {seq} tokens; "
          f"{'bf16 autocast, AC ' + str(args.gpu_ac) if gpu else 'fp32'}; {device}, "
          f"{args.threads} torch threads; {fpt / 1e6:.1f} MFLOP/token", flush=True)
    print(f"GEMM peak ({'bf16' if gpu else 'fp32'} {g['n']}^2): median {g['median'] / 1e9:.1f} "
          f"GFLOP/s, best {g['best'] / 1e9:.1f}" +
          (f"; internlm2 measure_peak_flops: {peak_info['loop_measure_peak_flops'] / 1e9:.1f}"
           if not gpu else ""), flush=True)

    base = {"threads": args.threads, "device": device, "batch": batch, "seq": seq,
            "warmup": warmup, "lr": args.lr, "omp_wait": args.omp_wait}
    if gpu:
        base.update(preset=preset, bf16=True, ac=args.gpu_ac)
    else:
        base.update(dims=dims)
    schedule = args.schedule or ("sequential" if gpu else "interleaved")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        order = variants if rnd % 2 == 0 else variants[::-1]
        print(f"round {rnd + 1}/{args.rounds}: build + {warmup} warmup steps per variant, then "
              f"{steps} timed steps ({schedule})", flush=True)
        runs = run_variants([{**base, "variant": v} for v in order], steps, args.timeout,
                            interleave=schedule == "interleaved", verbose=args.verbose,
                            log=lambda m: print(m, flush=True))
        for v, r in zip(order, runs):
            results[v].append(r)
            msg = r.get("error") or (f"{r['tokens_per_s']:.1f} tok/s, step {r['step_s']:.3f}s, "
                                     f"warmup {r['warmup_s']:.1f}s, loss0 {r['loss0']:.5f}")
            print(f"  round {rnd + 1} {v}: {msg}", flush=True)

    if not gpu:
        # The peak is the best sustained GEMM rate seen: at the start, or around any run's
        # steps (a start under heavier background load would otherwise give MFU above 100%).
        rates = [r["gemm_now"] for runs in results.values() for r in runs if r.get("gemm_now")]
        peak_info["gemm_fp32_median_in_runs_max"] = max(rates, default=0.0)
        peak = max([peak] + rates)
    best = summarise(results, fpt, peak)
    ok = {v: r for v, r in best.items() if "error" not in r}
    ref_loss = ok["ours-eager"]["loss0"] if "ours-eager" in ok else \
        next(iter(ok.values()))["loss0"] if ok else None
    ours = {v: r for v, r in ok.items() if v.startswith("ours")}
    theirs = {v: r for v, r in ok.items() if v.startswith("hf")}
    ours_best = max(ours, key=lambda v: ours[v]["tokens_per_s"]) if ours else None
    hf_best = max(theirs, key=lambda v: theirs[v]["tokens_per_s"]) if theirs else None
    ours_comp = [v for v in ours if "compile" in v]
    ours_comp_best = max(ours_comp, key=lambda v: ours[v]["tokens_per_s"]) if ours_comp else None
    max_dloss = max((abs(r["loss0"] - ref_loss) for r in ok.values()), default=None) \
        if ref_loss is not None else None

    title = (f"training step throughput, {n_params / 1e6:.1f}M params, batch {batch} x {seq}, "
             f"{'bf16' if gpu else 'fp32'} AdamW, {args.threads} threads; median of {steps} steps "
             f"after {warmup} warmup ({schedule}), fastest of {args.rounds} run(s); MFU vs "
             f"{'measured bf16 GEMM' if gpu else 'measured fp32 GEMM'} "
             f"{peak / (1e12 if gpu else 1e9):.1f} {'TFLOP/s' if gpu else 'GFLOP/s'}")
    print()
    print_table(best, title, ref_loss)
    figures: dict = {}
    if ours_best and hf_best:
        ratio = ours[ours_best]["tokens_per_s"] / theirs[hf_best]["tokens_per_s"]
        figures["ratio"] = ratio
        print(f"ours best ({ours_best}) / transformers best ({hf_best}): {ratio:.2f}x "
              f"(floor 1.1x) -> {'PASS' if ratio >= 1.1 else 'FAIL'}")
        if "ours-eager" in ours and "hf-eager" in theirs:
            figures["ratio_eager"] = ours["ours-eager"]["tokens_per_s"] / \
                theirs["hf-eager"]["tokens_per_s"]
        if ours_comp_best and "hf-compile" in theirs:
            figures["ratio_compiled"] = ours[ours_comp_best]["tokens_per_s"] / \
                theirs["hf-compile"]["tokens_per_s"]
        # Fastest single step of each side: background load only ever slows a step down.
        fast_ours = min(r["step_s_min"] for r in ours.values())
        fast_hf = min(r["step_s_min"] for r in theirs.values())
        figures["ratio_best_step"] = fast_hf / fast_ours
        print(f"  on the fastest single step of each side: {fast_hf / fast_ours:.2f}x")
        a, b = ours[ours_best].get("mfu_vs_gemm_now"), theirs[hf_best].get("mfu_vs_gemm_now")
        if a and b:
            figures["ratio_load_adjusted"] = a / b
            if schedule == "sequential":  # interleaved runs already share the machine's state
                print(f"  against each run's own GEMM rate (load-adjusted): {a / b:.2f}x")
        print("  eager/eager {}, compiled/compiled {}".format(
            f"{figures['ratio_eager']:.2f}x" if "ratio_eager" in figures else "-",
            f"{figures['ratio_compiled']:.2f}x" if "ratio_compiled" in figures else "-"))
    if max_dloss is not None:
        agree = max_dloss <= 1e-4
        figures["loss0_max_abs_diff"] = max_dloss
        figures["loss0_agree"] = agree
        print(f"step-0 loss, same weights and batch: max |diff| vs ours-eager {max_dloss:.2e} "
              f"({'OK' if agree else 'MISMATCH'}, tolerance 1e-4)")
    if gpu:
        for v, r in ok.items():
            r["mfu_vs_989T"] = r["tokens_per_s"] * fpt / H100_BF16_DENSE
        print("MFU vs 989 TFLOP/s (dense bf16): " + ", ".join(
            f"{v} {r['mfu_vs_989T']:.1%}" for v, r in ok.items()))
    else:
        drift = [r["gemm_now"] for r in ok.values() if r.get("gemm_now")]
        if drift:
            print(f"GEMM rate around each run's steps (median per run): {min(drift) / 1e9:.1f}-"
                  f"{max(drift) / 1e9:.1f} GFLOP/s (at the start: {g['median'] / 1e9:.1f})")
    if any(r.get("recompiled_in_timed_steps") for r in ok.values()):
        print("+R: torch.compile compiled again during the timed steps (a recompile after the "
              "warmup): raise --warmup")
    kinds = {r["peak_mem_kind"] for r in ok.values()}
    print("peak memory: " + "; ".join(sorted(kinds)))
    other = _other_cpu_share(cpu_probe)
    if other is not None and not gpu:
        figures["other_processes_cpu_share"] = other
        if other > 0.1:
            print(f"warning: other processes used {other:.0%} of the CPUs during the run; the "
                  "absolute figures are unreliable (rerun on an idle machine)")

    out: dict = {
        "bench": "train", "mode": "gpu" if gpu else ("quick" if args.quick else "cpu"),
        "params": n_params, "dims": dims, "preset": preset, "batch": batch, "seq": seq,
        "tokens_per_step": batch * seq, "dtype": "bf16-autocast" if gpu else "fp32",
        "threads": args.threads, "omp_wait_policy": args.omp_wait, "steps": steps,
        "warmup": warmup, "rounds": args.rounds, "schedule": schedule,
        "flops_per_token": fpt, "peak_flops": peak, "peak": peak_info,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "wall_s": time.perf_counter() - t_start,
        "ours_best": ours_best, "hf_best": hf_best, "ours_compiled_best": ours_comp_best,
        **figures,
        "variants": {v: {k: r[k] for k in r if k not in ("variant",)} for v, r in best.items()},
    }
    if "ratio" not in out:
        out["ratio"] = None
    out = _round(out)
    path = args.out or (None if args.quick else
                        str(ROOT / "bench" / "results" / ("train_gpu.json" if gpu
                                                           else "train.json")))
    return emit_results(out, path)


if __name__ == "__main__":
    main()
