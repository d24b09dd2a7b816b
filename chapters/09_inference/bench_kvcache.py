"""Greedy generation with and without the KV cache on a GPT-2-124M-shaped model,
against ``transformers``, and why a decode step is memory-bandwidth bound.

    python chapters/09_inference/bench_kvcache.py [--new-tokens 200] [--rounds 5]
        [--threads 1,2] [--json PATH] [--quick]

Random weights (the speed does not depend on them), GPT-2 small's shape (12 layers,
12 heads, width 768, context 1024, vocabulary 50,257), an 8-token prompt. Measured
in one run, for each thread count:

* our cached ``generate``, the same with ``set_decode_copies(model, False)`` (every
  weight read in ``nn.Linear``'s (out, in) layout; see ``shared.attention.
  apply_linear``) and ``transformers``' ``generate()`` on the same weights, in
  interleaved rounds whose order rotates, so the load other jobs put on this shared
  machine hits all three alike; medians of wall time (and of CPU time);
* the tokens: all runs must give the same ones, and those of recomputing without a
  cache (timed once, on the first thread count: it is slow);
* the memory story: bytes a decode step reads (every weight once, the 154 MB output
  layer included, plus the cached keys and values), FLOPs per token, their ratio
  (arithmetic intensity), the achieved GB/s (bytes per step / seconds per token),
  and this machine's memory bandwidth (sum and copy of 256 MiB) and matmul speed.

The first thread count gives the headline keys the notebook reads ("seconds",
"tokens_per_s", "speedup", "ours_vs_hf"); each count's numbers are under
"by_threads". One thread comes first: with two threads on this two-core machine,
which other jobs share, every parallel region waits for whichever thread was
descheduled, and the same run varies fivefold from round to round.

Writes ``results/kvcache.json`` (``--json`` elsewhere; ``--quick``, a seconds-long
smoke run on a small model, writes only with ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from shared.attention import decode_copy_bytes, set_decode_copies
from shared.generation import KVCache, generate
from shared.hf_export import hf_state_dict
from shared.model import GPT, GPTConfig

RESULTS = Path(__file__).parent / "results" / "kvcache.json"
NOTE = (
    "2 shared CPU cores, other engineers' jobs running: single timings vary by 20% "
    "or more; ratios are of medians over interleaved rounds"
)


def hf_copy(model: GPT):
    """``transformers``' GPT2LMHeadModel holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.n_embd,
        n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = GPT2LMHeadModel(cfg).eval()
    missing, _ = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte
    return hf


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """Wall seconds, CPU seconds (all threads of this process) and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def best_and_median(fn, reps: int = 7) -> tuple[float, float]:
    seconds = [timed(fn)[0] for _ in range(reps)]
    return min(seconds), statistics.median(seconds)


def machine(threads: int) -> dict:
    """Memory bandwidth (GB/s: sum reads 256 MiB, copy reads and writes them) and
    fp32 matmul speed (GFLOP/s, a (512, 768) x (768, 3072) product)."""
    torch.set_num_threads(threads)
    x = torch.randn(64 * 2**20)
    y = torch.empty_like(x)
    out = {}
    for name, fn, nbytes in [
        ("sum", x.sum, x.nbytes),
        ("copy", lambda: y.copy_(x), 2 * x.nbytes),
    ]:
        best, med = best_and_median(fn)
        out[f"{name} GB/s"] = round(nbytes / med / 1e9, 2)
        out[f"{name} GB/s best"] = round(nbytes / best / 1e9, 2)
    a, b = torch.randn(512, 768), torch.randn(768, 3072)
    best, med = best_and_median(lambda: a @ b)
    out["matmul GFLOP/s"] = round(2 * 512 * 768 * 3072 / med / 1e9, 1)
    out["matmul GFLOP/s best"] = round(2 * 512 * 768 * 3072 / best / 1e9, 1)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decode_traffic(model: GPT, prompt: int, new: int) -> dict:
    """What one decode step reads and computes, on average over the generation."""
    cfg = model.config
    params = model.num_parameters()
    # every weight once; of the position table, one row (the token's row of wte is
    # read again by the output layer, which reads all of it)
    weights = 4 * (params - model.transformer.wpe.weight.numel() + cfg.n_embd)
    mean_len = prompt + (new - 1) / 2  # cached positions a step attends to
    kv = KVCache.bytes_per_token(cfg) * mean_len
    matmul_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    attention = 2 * 2 * cfg.n_layer * cfg.n_embd * mean_len  # q.k and weights.v
    flops = 2 * matmul_params + attention
    return {
        "parameters": params,
        "weight_bytes_per_step": weights,
        "lm_head_bytes": 4 * model.lm_head.weight.numel(),
        "kv_cache_bytes_per_step_mean": round(kv),
        "bytes_per_step": round(weights + kv),
        "flops_per_token": round(flops),
        "arithmetic_intensity_flop_per_byte": round(flops / (weights + kv), 3),
    }


def race(runs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Each run once per round, the order rotated every round; lists of wall and CPU
    seconds per run, and each run's last output."""
    names = list(runs)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    outs = {}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            w, c, outs[k] = timed(runs[k])
            wall[k].append(w)
            cpu[k].append(c)
    return wall, cpu, outs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", default="1,2", help="comma-separated counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help=f"write the results here (default {RESULTS})")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    n, rounds = args.new_tokens, args.rounds
    torch.manual_seed(0)
    cfg = GPTConfig(50257, 1024, 12, 12, 768)
    if args.quick:
        cfg, n, rounds, threads = GPTConfig(1000, 64, 2, 2, 64), 8, 2, threads[:1]
    load_start = os.getloadavg()
    model = GPT(cfg).eval()
    plain = copy.deepcopy(model)  # the same weights, read in the (out, in) layout
    set_decode_copies(plain, False)
    hf = hf_copy(model)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))

    @torch.no_grad()
    def hf_generate() -> torch.Tensor:
        return hf.generate(
            idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    runs = {
        "cache": lambda: generate(model, idx, n, temperature=0),
        "hf": hf_generate,
        "cache, no decode copies": lambda: generate(plain, idx, n, temperature=0),
    }
    result: dict = {"new_tokens": n, "threads": threads[0], "rounds": rounds}
    by_threads, same_hf, same_plain = {}, True, True
    traffic = decode_traffic(model, idx.size(1), n)
    for i, th in enumerate(threads):
        torch.set_num_threads(th)
        for fn in runs.values():  # warm up; the first decode step makes the copies
            fn()
        if i == 0:  # recomputation without a cache: once, it is slow
            t_plain, _, uncached = timed(
                lambda: generate(model, idx, n, temperature=0, use_cache=False)
            )
        wall, cpu, outs = race(runs, rounds)
        same_hf &= torch.equal(outs["cache"], outs["hf"])
        same_plain &= torch.equal(outs["cache"], outs["cache, no decode copies"])
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        bw = machine(th)
        step_bytes, step_flops = traffic["bytes_per_step"], traffic["flops_per_token"]
        by_threads[str(th)] = {
            "seconds": wall,
            "cpu_seconds": cpu,
            "tokens_per_s": {k: n / v for k, v in med.items()},
            "ms_per_token": {k: 1e3 * v / n for k, v in med.items()},
            # a token's time includes its share of the prefill and the sampling,
            # so these slightly understate the decode step's own rate
            "achieved_GBps": {k: step_bytes * n / v / 1e9 for k, v in med.items()},
            "achieved_GBps_cpu_time": {
                k: step_bytes * n / v / 1e9 for k, v in med_cpu.items()
            },
            "ours_vs_hf": med["hf"] / med["cache"],
            "ours_vs_hf_cpu_time": med_cpu["hf"] / med_cpu["cache"],
            "ours_vs_hf_best_round": min(wall["hf"]) / min(wall["cache"]),
            "decode_copies_speedup": med["cache, no decode copies"] / med["cache"],
            "machine": bw,
            # the roofline: a step reads step_bytes, so at the measured bandwidth
            # no decoder gets more tokens/s; compute would allow far more
            "bandwidth_bound_tokens_per_s": bw["sum GB/s"] * 1e9 / step_bytes,
            "compute_bound_tokens_per_s": bw["matmul GFLOP/s"] * 1e9 / step_flops,
            "ridge_flop_per_byte": bw["matmul GFLOP/s"] / bw["sum GB/s"],
        }
        speeds = ", ".join(f"{k} {n / v:.1f}" for k, v in med.items())
        ratio = by_threads[str(th)]["ours_vs_hf"]
        print(f"{th} thread(s), tokens/s: {speeds}; ours / transformers {ratio:.2f}x")
    wall = by_threads[str(threads[0])]["seconds"]  # the first count: the main result
    t_cache, t_hf = statistics.median(wall["cache"]), statistics.median(wall["hf"])
    result |= {
        "seconds": {"no cache": t_plain, "cache": wall["cache"], "hf": wall["hf"]},
        "tokens_per_s": {"no cache": n / t_plain, "cache": n / t_cache, "hf": n / t_hf},
        "speedup": t_plain / t_cache,
        "ours_vs_hf": t_hf / t_cache,
        "same_tokens_cache": bool(torch.equal(outs["cache"], uncached)),
        "same_tokens_hf": bool(same_hf),
        "same_tokens_no_decode_copies": bool(same_plain),
        "by_threads": by_threads,
        "decode_step": traffic,
        "decode_copies_MB": decode_copy_bytes(model) / 1e6,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "blas": "MKL" if torch.backends.mkl.is_available() else "other",
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "note": NOTE,
    }
    for k, v in result["tokens_per_s"].items():
        print(f"{k:>9}: {v:7.1f} tokens/s")
    print(
        f"KV cache speed-up {result['speedup']:.1f}x; ours / transformers "
        f"{result['ours_vs_hf']:.2f}x; same tokens: cache "
        f"{result['same_tokens_cache']}, transformers {result['same_tokens_hf']}; "
        f"{traffic['bytes_per_step'] / 1e6:.0f} MB and "
        f"{traffic['flops_per_token'] / 1e6:.0f} MFLOP per token "
        f"({traffic['arithmetic_intensity_flop_per_byte']:.2f} FLOP/byte)"
    )
    path = args.json or (None if args.quick else RESULTS)
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
