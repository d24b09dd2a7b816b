"""Where one decode step of a GPT-2-124M-shaped model spends its time, ours and HF's.

    python chapters/09_inference/profile_decode.py [--threads 1] [--rounds 7]
        [--profile] [--compile] [--quick] [--json out.json]

Four measurements, each interleaved over rounds (medians; the machine is shared, so
single timings are noise):

1. ``layout``: the one-row product ``x @ W`` of each kind of weight in GPT-2 small,
   twelve different matrices per kind (as a step streams them from memory), with
   the weight stored (out, in) as ``nn.Linear`` does and (in, out) as GPT-2's
   Conv1D does; and for c_fc, with 1, 2, 4 and 8 rows.
2. ``step``: one cached decode step (``GPT.forward`` of one token) with and without
   ``shared.attention.decode_weight``'s (in, out) copies, and ``transformers``'
   GPT2LMHeadModel step with its cache; the same on a 12-layer model 48 wide,
   where the matrices cost nothing and only the per-step overhead is left.
3. ``overhead``: microseconds of the small per-step pieces (input checks, the
   causal mask, argmax over the vocabulary, the growing ``torch.cat`` of ids).
4. ``--profile``: ``torch.profiler``'s top operators of ten steps of each;
   ``--compile``: ``torch.compile`` of the decode step (seconds to compile, then ms).

On one thread the clock is the process's CPU time (``time.process_time``), which
other engineers' jobs on the machine do not inflate; on more, wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_kvcache import hf_copy

from shared.attention import causal_mask, check_in_range, set_decode_copies
from shared.generation import KVCache
from shared.model import GPT, GPTConfig

KINDS = {  # weight (in, out) of each Linear kind in GPT-2 small, and how many
    "attn.c_attn": (768, 2304, 12),
    "attn.c_proj": (768, 768, 12),
    "mlp.c_fc": (768, 3072, 12),
    "mlp.c_proj": (3072, 768, 12),
    "lm_head": (768, 50257, 1),
}


def medians(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each timing function once per round, interleaved; median of each."""
    for fn in fns.values():  # warm-up: first calls allocate and fault pages in
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def timer(clock: Callable[[], float], fn: Callable[[], object], reps: int = 1):
    def run() -> float:
        start = clock()
        for _ in range(reps):
            fn()
        return (clock() - start) / reps

    return run


def layout(clock, rounds: int) -> dict:
    """ms per kind for both weight layouts, one row; rows sweep for mlp.c_fc."""
    fns, sizes = {}, {}
    for name, (d_in, d_out, n) in KINDS.items():
        ws = [torch.randn(d_out, d_in) * 0.02 for _ in range(n)]
        ws_t = [w.t().contiguous() for w in ws]
        b, x = torch.zeros(d_out), torch.randn(1, d_in)
        fns[f"{name} (out, in)"] = timer(clock, lambda ws=ws, b=b, x=x: [
            F.linear(x, w, b) for w in ws])  # fmt: skip
        fns[f"{name} (in, out)"] = timer(clock, lambda ws=ws_t, b=b, x=x: [
            torch.addmm(b, x, w) for w in ws])  # fmt: skip
        sizes[name] = n * d_in * d_out * 4
    ms = {k: 1e3 * v for k, v in medians(fns, rounds).items()}
    out = {k: round(v, 3) for k, v in ms.items()}
    for name, nbytes in sizes.items():
        for lay in ("(out, in)", "(in, out)"):
            out[f"{name} {lay} GB/s"] = round(nbytes / ms[f"{name} {lay}"] / 1e6, 2)
    ws = [torch.randn(3072, 768) * 0.02 for _ in range(24)]
    ws_t = [w.t().contiguous() for w in ws]
    b = torch.zeros(3072)
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, 768)
        fns = {
            "(out, in)": timer(clock, lambda x=x: [F.linear(x, w, b) for w in ws]),
            "(in, out)": timer(clock, lambda x=x: [torch.addmm(b, x, w) for w in ws_t]),
        }
        for k, v in medians(fns, rounds).items():
            out[f"mlp.c_fc x24, {rows} rows {k}"] = round(1e3 * v, 3)
    return out


def decode_steps(model: GPT, hf, clock, n: int = 10, step=None) -> dict[str, Callable]:
    """Timing functions: mean seconds of ``n`` decode steps after 8 + 1 tokens
    (``step``: what runs the steps, e.g. a compiled model; default ``model``)."""
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    tok = torch.tensor([[5]])
    step = model if step is None else step

    @torch.no_grad()
    def ours() -> float:
        cache = KVCache(model.config.n_layer, 9 + n)
        model(idx, kv_cache=cache)
        step(tok, kv_cache=cache)  # untimed: makes the decode copies if missing
        start = clock()
        for _ in range(n):
            step(tok, kv_cache=cache)
        return (clock() - start) / n

    def ours_no_copies() -> float:
        set_decode_copies(model, False)
        try:
            return ours()
        finally:
            set_decode_copies(model, True)

    @torch.no_grad()
    def hf_step() -> float:
        past = hf(idx, use_cache=True).past_key_values
        past = hf(tok, past_key_values=past, use_cache=True).past_key_values
        start = clock()
        for _ in range(n):
            past = hf(tok, past_key_values=past, use_cache=True).past_key_values
        return (clock() - start) / n

    return {"ours": ours, "ours, no decode copies": ours_no_copies, "hf": hf_step}


def overheads(clock) -> dict[str, float]:
    """Microseconds per call of the small things a decode step does besides matmuls."""
    ids, pos = torch.randint(0, 50257, (1, 1)), torch.tensor([200])
    logits = torch.randn(1, 50257)
    grown = torch.randint(0, 50257, (1, 200))
    fns = {
        "check_in_range(token ids)": lambda: check_in_range(ids, 50257, "ids"),
        "check_in_range(position ids)": lambda: check_in_range(pos, 1024, "pos"),
        "old check: ge, lt, and, all, bool": lambda: bool(
            ((ids >= 0) & (ids < 50257)).all()
        ),
        "causal_mask(1, 200) (once per layer before)": lambda: ~causal_mask(1, 200),
        "torch.arange position id": lambda: torch.arange(200, 201),
        "argmax over 50257 logits": lambda: logits.argmax(-1, keepdim=True),
        "torch.cat of 200 ids + 1": lambda: torch.cat([grown, ids], 1),
    }
    fns = {k: timer(clock, fn, reps=2000) for k, fn in fns.items()}
    return {k: round(1e6 * v, 2) for k, v in medians(fns, 5).items()}


def profile_tables(model: GPT, hf, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, fn in decode_steps(model, hf, time.perf_counter).items():
        if name == "ours, no decode copies":
            continue
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"--- {name}: 10 decode steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def compiled(model: GPT, clock, rounds: int) -> dict[str, float]:
    """``torch.compile`` of the model for decode steps (the cache length varies, so
    ``dynamic=True``): seconds until the first steps ran, then ms per step."""
    step = torch.compile(model, dynamic=True)
    start = time.perf_counter()
    with torch.no_grad():
        cache = KVCache(model.config.n_layer, 16)
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        for t in (4, 5):  # the first call compiles; a second length must not
            step(torch.tensor([[t]]), kv_cache=cache)
    seconds = time.perf_counter() - start
    fns = {
        "eager": decode_steps(model, None, clock)["ours"],
        "compiled": decode_steps(model, None, clock, step=step)["ours"],
    }
    ms = {f"{k} ms": round(1e3 * v, 2) for k, v in medians(fns, rounds).items()}
    return {"compile_s": round(seconds, 1)} | ms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    rounds = 2 if args.quick else args.rounds
    big = GPTConfig(50257, 1024, 12, 12, 768)
    small = GPTConfig(64, 1024, 12, 12, 48)  # 12 layers, negligible matmuls
    shapes = [("124M", big), ("tiny (48 wide)", small)][args.quick :]
    result: dict = {"threads": args.threads, "rounds": rounds}
    result["clock"] = "process CPU time" if args.threads == 1 else "wall"
    if not args.quick:
        result["layout_ms"] = layout(clock, rounds)
    for label, cfg in shapes:
        model = GPT(cfg).eval()
        hf = hf_copy(model)
        steps = medians(decode_steps(model, hf, clock), rounds)
        result[f"step_ms {label}"] = {k: round(1e3 * v, 2) for k, v in steps.items()}
        if args.profile and label == "124M":
            profile_tables(model, hf)
        if args.compile and label == shapes[0][0]:
            result[f"compile {label}"] = compiled(model, clock, rounds)
    result["overhead_us"] = overheads(clock)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
