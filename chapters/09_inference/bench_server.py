"""Continuous batching measured: the scheduler against one request after another,
the HTTP server under 1 to 16 concurrent clients, and a decode step's time against
the batch size.

    python chapters/09_inference/bench_server.py [--quick] [--threads 1]

The shipped base model (chapter 4's Shakespeare model): it writes on to the token
budget (it seldom emits <|endoftext|>), so every request decodes the same number of
tokens and the comparison is of decoding alone; the chat models answer in a few
tokens and stop. The prompts are the first words of held-out lines (the validation
tenth of Tiny Shakespeare), greedy, so each request's text is known: the batched
texts are asserted equal to the solo ones. Variants run interleaved, rounds give
medians; the machine is shared and noisy. Writes ``results/server.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from shared.data import REPO_ROOT, read_text
from shared.dataset import train_val_split
from shared.generation import Request, Scheduler, generate
from shared.pretrained import load_course_model

RESULTS = Path(__file__).parent / "results" / "server.json"


def held_out_prompts(tokenizer, n: int, words: int = 6) -> list[str]:
    """The first ``words`` words of ``n`` held-out lines of 8+ words, all different."""
    _, val = train_val_split(read_text("tinyshakespeare"), 0.1)
    lines = [line.split() for line in val.splitlines() if len(line.split()) >= 8]
    prompts = list(dict.fromkeys(" ".join(line[:words]) for line in lines))
    step = len(prompts) // n  # spread over the whole held-out text
    return [prompts[i * step] for i in range(n)]


def solo_texts(model, ids: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt alone through ``generate``, one after another."""
    return [
        generate(model, torch.tensor([p]), n, temperature=0)[0, len(p) :].tolist()
        for p in ids
    ]


def batched_texts(model, ids: list[list[int]], n: int) -> list[list[int]]:
    """All prompts at once through the continuous-batching scheduler."""
    requests = [Request(p, n, temperature=0) for p in ids]
    Scheduler(model, max_batch=len(ids)).run(requests)
    return [r.tokens for r in requests]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def scheduler_vs_solo(model, ids: list[list[int]], n: int, rounds: int) -> dict:
    solo_s, batched_s = [], []
    for _ in range(rounds):  # interleaved: the machine's load hits both
        t, solo = timed(solo_texts, model, ids, n)
        solo_s.append(t)
        t, batched = timed(batched_texts, model, ids, n)
        batched_s.append(t)
        assert batched == solo, "a batched text differs from its solo text"
    solo_m, batched_m = statistics.median(solo_s), statistics.median(batched_s)
    return {
        "requests": len(ids),
        "new_tokens": n,
        "solo_s": solo_s,
        "batched_s": batched_s,
        "median_solo_s": solo_m,
        "median_batched_s": batched_m,
        "speedup": solo_m / batched_m,
        "texts_equal": True,  # asserted above, every round
    }


def decode_step_times(model, batch_sizes: list[int], steps: int, rounds: int) -> dict:
    """Median time of one scheduler step with B requests decoding (no prefill):
    the sizes interleaved, ``steps`` steps each per round."""
    schedulers = {}
    for b in batch_sizes:
        schedulers[b] = Scheduler(model, max_batch=b)
        for i in range(b):  # 16-token prompts, then decoding from position 16 on
            prompt = [(7 * i + j) % 1000 for j in range(16)]
            schedulers[b].add(Request(prompt, rounds * steps + 2, temperature=0))
        schedulers[b].step()  # the prefills
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(rounds):
        for b, scheduler in schedulers.items():
            times[b] += [timed(scheduler.step)[0] for _ in range(steps)]
    ms = [1000 * statistics.median(times[b]) for b in batch_sizes]
    return {
        "batch_size": batch_sizes,
        "ms_per_step": ms,
        "tokens_per_s": [b / (m / 1000) for b, m in zip(batch_sizes, ms, strict=True)],
        "step_time_vs_batch_1": [m / ms[0] for m in ms],
    }


# ------------------------------------------------------------------ through HTTP


def start_server(threads: int, max_batch: int) -> tuple[subprocess.Popen, str, int]:
    """``python -m shared.serve`` in its own process (its own interpreter lock)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "shared.serve", "--port", "0", "--device", "cpu"]
    command += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    line = proc.stderr.readline()  # "serving base on http://127.0.0.1:PORT ..."
    host, port = line.split("http://")[1].split()[0].split(":")
    return proc, host, int(port)


def one_stream(host: str, port: int, prompt: str, n: int) -> dict:
    """One streamed completion: time to first text, tokens, end."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection(host, port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body))
    response = conn.getresponse()
    first = tokens = None
    for line in response:  # server-sent events, one "data: ..." line each
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return {"start": start, "first": first, "end": end, "tokens": tokens}


def http_round(host: str, port: int, prompts: list[str], n: int) -> dict:
    """``len(prompts)`` clients at once, each streaming one completion."""
    results: list[dict] = [{}] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        barrier.wait()
        results[i] = one_stream(host, port, prompts[i], n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "ttft_ms": [1000 * (r["first"] - r["start"]) for r in results],
        "tokens_per_s": [r["tokens"] / (r["end"] - r["start"]) for r in results],
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
    }


def http_bench(prompts, clients: list[int], n: int, rounds: int, threads: int) -> dict:
    proc, host, port = start_server(threads, max(clients))
    try:
        one_stream(host, port, prompts[0], 4)  # warm up
        runs: dict[int, list[dict]] = {c: [] for c in clients}
        for _ in range(rounds):  # interleaved over the client counts
            for c in clients:
                runs[c].append(http_round(host, port, prompts[:c], n))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {}
    for c, rs in runs.items():
        ttft = [x for r in rs for x in r["ttft_ms"]]
        rate = [x for r in rs for x in r["tokens_per_s"]]
        out[str(c)] = {
            "median_ttft_ms": statistics.median(ttft),
            "max_ttft_ms": max(ttft),
            "median_tokens_per_s_per_request": statistics.median(rate),
            "median_aggregate_tokens_per_s": statistics.median(
                r["aggregate_tokens_per_s"] for r in rs
            ),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(RESULTS), help="where to write")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds = 12, 1
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_course_model("cpu", name="base")
    prompts = held_out_prompts(tokenizer, 16)
    ids = [tokenizer.encode(p) for p in prompts]
    context = model.config.context_length
    assert max(map(len, ids)) + args.new_tokens <= context, "prompts too long"
    batched_texts(model, ids[:2], 4)  # warm up
    clients = [1, 4] if args.quick else [1, 4, 8, 16]
    sizes = [1, 2, 4] if args.quick else [1, 2, 4, 8, 12, 16]
    result = {
        "model": "base",
        "threads": args.threads,
        "settings": {k: v for k, v in vars(args).items() if k != "json"}
        | {"greedy": True, "max_batch": max(clients), "prompts": prompts},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_1min_at_start": os.getloadavg()[0],
            "note": "2 cores shared with other work: noisy; medians of rounds",
        },
        "scheduler_vs_solo": scheduler_vs_solo(
            model, ids[:8], args.new_tokens, args.rounds
        ),
        "decode_step": decode_step_times(
            model, sizes, 5 if args.quick else 10, args.rounds
        ),
        "http": http_bench(
            prompts, clients, args.new_tokens, args.rounds, args.threads
        ),
    }
    s = result["scheduler_vs_solo"]
    print(
        f"8 requests x {s['new_tokens']} tokens: solo {s['median_solo_s']:.2f} s, "
        f"batched {s['median_batched_s']:.2f} s -> {s['speedup']:.2f}x, same texts"
    )
    d = result["decode_step"]
    for b, ms, tps in zip(
        d["batch_size"], d["ms_per_step"], d["tokens_per_s"], strict=True
    ):
        print(f"decode step, batch {b:2d}: {ms:6.2f} ms, {tps:7.1f} tokens/s")
    for c, h in result["http"].items():
        print(
            f"{c:>2} clients: TTFT {h['median_ttft_ms']:6.1f} ms (max "
            f"{h['max_ttft_ms']:.0f}), {h['median_tokens_per_s_per_request']:6.1f} "
            f"tokens/s per request, {h['median_aggregate_tokens_per_s']:6.1f} in all"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
