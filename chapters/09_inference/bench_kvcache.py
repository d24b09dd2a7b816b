"""Greedy generation with and without the KV cache on a GPT-2-124M-shaped model.

    python chapters/09_inference/bench_kvcache.py [--new-tokens 200] [--threads 2]

Random weights (the speed does not depend on them), GPT-2 small's shape (12 layers,
12 heads, width 768, context 1024, vocabulary 50,257), an 8-token prompt. Prints
tokens/s without the cache, with it, and for ``transformers``' ``generate()`` on the
same weights, all measured side by side in this one run (the cached and the
``transformers`` runs interleaved, medians), and checks the three give the same
tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from shared.generation import generate
from shared.hf_export import hf_state_dict
from shared.model import GPT, GPTConfig


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


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="cached and HF runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(50257, 1024, 12, 12, 768)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    n = args.new_tokens
    generate(model, idx, 5, temperature=0)  # warm up
    t_plain, plain = timed(
        lambda: generate(model, idx, n, temperature=0, use_cache=False)
    )
    hf = hf_copy(model)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(
                idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip

    hf_generate()  # warm up
    cache_times, hf_times = [], []
    for _ in range(args.rounds):  # interleaved, so load on the machine hits both
        t, cached = timed(lambda: generate(model, idx, n, temperature=0))
        cache_times.append(t)
        t, hf_out = timed(hf_generate)
        hf_times.append(t)
    t_cache, t_hf = statistics.median(cache_times), statistics.median(hf_times)
    result = {
        "new_tokens": n,
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": {"no cache": t_plain, "cache": cache_times, "hf": hf_times},
        "tokens_per_s": {"no cache": n / t_plain, "cache": n / t_cache, "hf": n / t_hf},
        "speedup": t_plain / t_cache,
        "ours_vs_hf": t_hf / t_cache,
        "same_tokens_cache": bool(torch.equal(cached, plain)),
        "same_tokens_hf": bool(torch.equal(cached, hf_out)),
    }
    for k, v in result["tokens_per_s"].items():
        print(f"{k:>9}: {v:7.1f} tokens/s")
    print(
        f"KV cache speed-up {result['speedup']:.1f}x; ours / transformers "
        f"{result['ours_vs_hf']:.2f}x; same tokens: cache "
        f"{result['same_tokens_cache']}, transformers {result['same_tokens_hf']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
