"""Training speed of the course GPT at nanoGPT's CPU size: fused vs explicit attention.

nanoGPT's documented CPU run on Tiny Shakespeare uses 4 layers, 4 heads, 128 wide,
context 64, batch 12, vocabulary 65, no biases, no dropout. We time forward + backward
(and, separately, a full AdamW step) with both attention paths, interleaved in the same
run so that background load hits both alike, and print medians and ratios.

On a machine busy with other work, two PyTorch threads can run many times slower than
one (threads wait for each other at every operation); try ``--threads 1`` there.

    python chapters/03_gpt_model/bench_gpt.py [--repeats 5] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shared.model import GPT, GPTConfig

NANOGPT_CPU = dict(vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


def time_steps(model: GPT, x, y, steps: int, optimizer=None) -> float:
    """Seconds for ``steps`` training steps (forward + backward [+ optimizer])."""
    start = time.perf_counter()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 65, (2, BATCH, 64), generator=g)
    models, optims = {}, {}
    for impl in ("fused", "explicit"):
        torch.manual_seed(0)
        cfg = GPTConfig(**NANOGPT_CPU, bias=False, attn_impl=impl)
        models[impl] = GPT(cfg).train()
        optims[impl] = torch.optim.AdamW(models[impl].parameters(), lr=1e-3)
    tokens = BATCH * 64 * args.steps
    n = models["fused"].num_parameters()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {n:,} parameters")
    print(f"batch {BATCH} x context 64, {args.steps} steps x {args.repeats} repeats")

    for label, with_optim in [("forward+backward", False), ("full AdamW step", True)]:
        times: dict[str, list[float]] = {"fused": [], "explicit": []}
        for impl in models:  # warm-up
            time_steps(models[impl], x, y, 3, optims[impl] if with_optim else None)
        for _ in range(args.repeats):
            for impl in models:  # interleaved: both see the same background load
                opt = optims[impl] if with_optim else None
                times[impl].append(time_steps(models[impl], x, y, args.steps, opt))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{label}:")
        for impl in models:
            lo, hi = tokens / max(times[impl]), tokens / min(times[impl])
            print(
                f"  {impl:8s} median {tokens / med[impl]:9,.0f} tokens/s "
                f"(range {lo:,.0f}-{hi:,.0f})"
            )
        print(f"  fused / explicit speed ratio: {med['explicit'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
